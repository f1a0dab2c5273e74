"""Ray Tune's Pareto search, the `ray job submit` entry point: `ray-unlearn search` by another name.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/search.py --target-seed 7 --space surrogate --trials 16 --workers 1 --gpu \\
            --storage s3://bucket/ray-unlearn --tracking-uri http://mlflow:5000 --promote

Takes exactly the options of `ray-unlearn search` (`python jobs/search.py --help`). Runs from a
checkout without the package installed too (jobs/_checkout.py).
"""

from __future__ import annotations

import sys

import _checkout  # noqa: F401  (a checkout without an install: see jobs/_checkout.py)


def main(argv: list[str] | None = None) -> int:
    from ray_unlearn.cli import run_command

    return run_command("search", sys.argv[1:] if argv is None else argv, "jobs/search.py")


if __name__ == "__main__":
    sys.exit(main())
