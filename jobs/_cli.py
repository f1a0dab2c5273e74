"""What every jobs/ script shares: run one `ray-unlearn` command, from an install or a checkout.

Finding the package:
- with it installed (`pip install .`, or `make install`'s editable install) there is nothing to do;
- under `ray job submit --working-dir .` Ray puts its copy of the working dir on PYTHONPATH for
  the driver and every worker: nothing to do either;
- `python jobs/X.py` in a checkout without an install: Python puts jobs/ (not the repository
  root) on sys.path, so the root is added here.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import ray_unlearn  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_cli(command: str, script: str) -> None:
    """`ray-unlearn COMMAND` with this script's arguments; exits with the command's exit code."""
    from ray_unlearn.cli import run_command

    sys.exit(run_command(command, sys.argv[1:], script))
