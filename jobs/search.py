"""Ray Tune's Pareto search, the `ray job submit` entry point: `ray-unlearn search` by another name.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/search.py --target-seed 7 --space surrogate --trials 16 --workers 1 --gpu \\
            --storage s3://bucket/ray-unlearn --tracking-uri http://mlflow:5000 --promote

Takes exactly the options of `ray-unlearn search` (`python jobs/search.py --help`). Runs from a
checkout without the package installed too (jobs/_cli.py).
"""

from _cli import run_cli  # (jobs/_cli.py: also finds the package in a bare checkout)

if __name__ == "__main__":
    run_cli("search", "jobs/search.py")
