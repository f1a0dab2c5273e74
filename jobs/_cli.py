"""Lets `python jobs/X.py` run from a plain checkout, the one case that needs help.

- With the package installed (`pip install .`, or `make install`'s editable install) there is
  nothing to do.
- Under `ray job submit --working-dir .` Ray puts its copy of the working dir on PYTHONPATH
  for the driver and every worker: nothing to do either.
- `python jobs/X.py` in a checkout without an install: Python puts jobs/ (not the repository
  root) on sys.path, so the root is added here.
Every job script imports this module first (jobs/ is on sys.path when a script in it runs).
"""

import sys
from pathlib import Path

try:
    import ray_unlearn  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
