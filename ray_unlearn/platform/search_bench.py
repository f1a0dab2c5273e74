"""Benchmark of the search itself: the multi-objective search's front vs. a grid of the same size,
both on the demo model, measured side by side in one run (same machine, same target, same cache).

Figures: hypervolume of each front (reference point: forget objective 0, i.e. the boundary of
specific forgetting (platform/search.py OBJECTIVES), integrity 0; scored
at full size after the re-check, and on the proxy set), their ratio (target >= 1.2), and the
number of base-model sampling passes per search (target: 1; the shared reference outputs).
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

from ray_unlearn.config import load_config
from ray_unlearn.platform.cluster import init_ray
from ray_unlearn.platform.search import SearchOptions, run_search
from ray_unlearn.search_space import load_space


def grid_points(space: dict, per_axis: int = 2) -> list[dict]:
    """A full factorial grid: `per_axis` evenly spaced interior values per searched key (at the
    1/(2n), 3/(2n), ... quantiles; log-spaced for loguniform), choices as given. 4 keys x 2 = 16."""
    axes = {}
    for key, (kind, args) in space["space"].items():
        if kind == "choice":
            axes[key] = list(args)
            continue
        qs = [(2 * i + 1) / (2 * per_axis) for i in range(per_axis)]
        lo, hi = args
        if kind == "loguniform":
            vals = [math.exp(math.log(lo) + q * (math.log(hi) - math.log(lo))) for q in qs]
        else:
            vals = [lo + q * (hi - lo) for q in qs]
        axes[key] = [int(round(v)) for v in vals] if kind == "int" else [float(f"{v:.4g}") for v in vals]
    return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]


def run_search_benchmark(trials: int = 16, space: str = "demo", out: str | Path = "runs/bench-search",
                         target_seed: int = 7, progress: bool = True) -> dict:
    root = Path(out).resolve()
    sp = load_space(space)
    grid = grid_points(sp)
    if len(grid) != trials:
        raise ValueError(f"the grid of {space} has {len(grid)} points; run with --trials {len(grid)} for a fair comparison")
    cfg = load_config(None, [f"cache_dir={root / 'cache'}"], base={"targets": [{"seed": target_seed}]})
    init_ray()
    common = dict(space=space, trials=trials, storage=str(root / "store"),
                  tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    res = {"space": space, "trials_each": trials, "target_seed": target_seed}
    for label, opts in (("optuna", SearchOptions(**common, searcher="optuna", name="bench-optuna")),
                        ("grid", SearchOptions(**common, searcher="grid", grid=grid, name="bench-grid"))):
        t0 = time.perf_counter()
        s = run_search(cfg, opts, progress=progress)
        res[label] = {"hypervolume": s["hypervolume"], "hypervolume_proxy": s["hypervolume_proxy"],
                      "front_size": len(s["front"]), "forgot": sum(p["forgotten"] for p in s["trials"]),
                      "trials_ok": len(s["trials"]), "base_sampling_passes": s["base_sampling_passes"],
                      "minutes": round((time.perf_counter() - t0) / 60, 1), "pareto": s["pareto_uri"]}
    g, o = res["grid"], res["optuna"]
    res["hypervolume_ratio"] = round(o["hypervolume"] / g["hypervolume"], 3) if g["hypervolume"] else math.inf
    res["hypervolume_ratio_proxy"] = (round(o["hypervolume_proxy"] / g["hypervolume_proxy"], 3)
                                      if g["hypervolume_proxy"] else math.inf)
    return res
