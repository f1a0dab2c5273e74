"""One unlearning run on Ray Train, the `ray job submit` entry point: `ray-unlearn train` by another name.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/unlearn.py --config my.yaml --target-seed 7 --workers 2 --gpu --storage s3://bucket/runs --json

Takes exactly the options of `ray-unlearn train` (`python jobs/unlearn.py --help`). Runs from a
checkout without the package installed too (jobs/_checkout.py).
"""

from __future__ import annotations

import sys

import _checkout  # noqa: F401  (a checkout without an install: see jobs/_checkout.py)


def main(argv: list[str] | None = None) -> int:
    from ray_unlearn.cli import run_command

    return run_command("train", sys.argv[1:] if argv is None else argv, "jobs/unlearn.py")


if __name__ == "__main__":
    sys.exit(main())
