"""Benchmark entry (also for `ray job submit -- python jobs/benchmark.py`): prints ratios measured
side by side in one run. Usage: python jobs/benchmark.py [--steps 10] [--samples 16] [--json]"""

from __future__ import annotations

import argparse
import json

from ray_unlearn.bench import run_benchmark
from ray_unlearn.config import load_config


def main(cfg_path: str | None, sets: list[str], steps: int, samples: int, as_json: bool) -> dict:
    res = run_benchmark(steps=steps, n_samples=samples, cfg=load_config(cfg_path, sets))
    print(json.dumps(res, indent=2) if as_json else "\n".join(f"{k:>28}: {v}" for k, v in res.items()))
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override key=value")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--samples", type=int, default=16, help="images for the sampling rate")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    main(a.config, a.sets, a.steps, a.samples, a.json)
