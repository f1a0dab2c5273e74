"""Process a batch of deletion requests, the `ray job submit` entry point: `ray-unlearn requests process`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/process_requests.py --store s3://bucket/unlearn --tracking-uri http://mlflow:5000 --limit 8

Takes exactly the options of `ray-unlearn requests process` (`python jobs/process_requests.py --help`);
exit statuses as in ray_unlearn/exit_codes.py (0 ok, 1 a request failed, 2 bad usage, 3 a gate
refused, 4 storage/MLflow/Ray trouble). Runs from a checkout without the package
installed too (the repository root goes on sys.path).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import ray_unlearn  # noqa: F401
except ImportError:  # a checkout (e.g. a job's working_dir) without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    from ray_unlearn.cli import app

    try:
        app(["requests", "process", *(sys.argv[1:] if argv is None else argv)], prog_name="jobs/process_requests.py")
    except SystemExit as exit_:  # typer ends with SystemExit; return its code instead
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
