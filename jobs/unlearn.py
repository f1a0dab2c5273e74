"""One unlearning run on Ray Train, the `ray job submit` entry point: `ray-unlearn train` by another name.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/unlearn.py --config my.yaml --target-seed 7 --workers 2 --gpu --storage s3://bucket/runs --json

Takes exactly the options of `ray-unlearn train` (`python jobs/unlearn.py --help`). Runs from a
checkout without the package installed too (jobs/_cli.py).
"""

from _cli import run_cli  # (jobs/_cli.py: also finds the package in a bare checkout)

if __name__ == "__main__":
    run_cli("train", "jobs/unlearn.py")
