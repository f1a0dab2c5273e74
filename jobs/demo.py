"""The main job on embedded defaults (`ray-unlearn demo` by another name): a deletion request for
the shipped demo model's output, a Pareto search on Ray, MLflow on SQLite, the best hotfix promoted.

    python jobs/demo.py                       # local Ray, everything under runs/demo
    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/demo.py --out /shared/demo

Runs from a checkout without the package installed too (jobs/_checkout.py).
"""

from __future__ import annotations

import sys

import _checkout  # noqa: F401  (a checkout without an install: see jobs/_checkout.py)


def main(argv: list[str] | None = None) -> int:
    from ray_unlearn.cli import run_command

    return run_command("demo", sys.argv[1:] if argv is None else argv, "jobs/demo.py")


if __name__ == "__main__":
    sys.exit(main())
