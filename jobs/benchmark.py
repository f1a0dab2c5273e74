"""Benchmark entry (also for `ray job submit -- python jobs/benchmark.py`): prints ratios measured
side by side in one run.

    python jobs/benchmark.py [--steps 10] [--samples 16] [--json]      the loop: surgery vs plain step, sampling rate
    python jobs/benchmark.py --search [--trials 16]                    the search: Pareto hypervolume of the
                                                                       multi-objective search vs a 16-point grid,
                                                                       base-model sampling passes per search
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    import ray_unlearn  # noqa: F401
except ImportError:  # a checkout (e.g. a job's working_dir) without `pip install`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override key=value")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--samples", type=int, default=16, help="images for the sampling rate")
    ap.add_argument("--search", action="store_true", help="benchmark the Pareto search instead (minutes to an hour on CPU)")
    ap.add_argument("--trials", type=int, default=16, help="trials per search (--search)")
    ap.add_argument("--out", default="runs/bench-search", help="where the searches write (--search)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.search:
        from ray_unlearn.platform.search_bench import run_search_benchmark

        res = run_search_benchmark(trials=a.trials, out=a.out, progress=not a.json)
    else:
        from ray_unlearn.bench import run_benchmark
        from ray_unlearn.config import load_config

        res = run_benchmark(steps=a.steps, n_samples=a.samples, cfg=load_config(a.config, a.sets))
    print(json.dumps(res, indent=2) if a.json else "\n".join(f"{k:>28}: {v}" for k, v in res.items()))
    return res


if __name__ == "__main__":
    main()
