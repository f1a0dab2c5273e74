"""Benchmark entry (also for `ray job submit -- python jobs/benchmark.py`): prints ratios and MFU
measured side by side in one run.

    python jobs/benchmark.py [--steps 10] [--samples 16] [--compile] [--json]
        the loop: surgery vs plain step, bf16 / channels_last / compile / log-sync ratios against
        fp32, sampling rate, DDIM 50 vs the fast solver's network evaluations; MFU of each
    python jobs/benchmark.py --suite gpu [--tiny] [--out gpu_suite.json]
        the prepared GPU suite (<= 7 min on one H100/H200, downloads nothing): the CelebA-HQ 256
        architecture with random weights; --tiny runs the same code on CPU in seconds
    python jobs/benchmark.py --sampler-agreement [--fast-steps 20]
        do the fast solver's verdicts and integrity SSIM agree with DDIM 50 on the demo model and on
        hotfixes made in the run (surrogate, NegGrad, a two-request sequential hotfix)?
    python jobs/benchmark.py --scaling [--workers 1 2] [--samples 16]
        verification sampling over Ray Train workers: scaling efficiency
    python jobs/benchmark.py --search [--trials 16]
        the search: Pareto hypervolume of the multi-objective search vs a 16-point grid
    python jobs/benchmark.py --table [--targets 8] [--presets paper demo] [--tiny] [--out runs/table]
        the paper's Table I on the demo model (ray_unlearn/table.py): every method at its presets on
        seeds drawn from a fixed RNG; writes table.md, table.json and grid.png
    python jobs/benchmark.py --table --targets 4 --rng-seed 1107 --arm NAME=surrogate@demo,train.lr=1e-4 ...
        a tuning grid: only the given arms, on seeds from the tuning RNG (never Table I's)
    python jobs/benchmark.py --table --arm best=siss@demo,pareto=runs/search-siss/pareto.json ...
        a method at the point a search (`ray-unlearn search --out DIR`) chose; front=PATH instead: its
        most intact front point that forgot the target (for a search that chose none)
    python jobs/benchmark.py --continual [--requests 20] [--strategies sequential anchored joint merge] [--tiny]
            [--budget-minutes M] [--out runs/bench-continual]
        many deletion requests in a row through the real queue and processor, once per continual
        strategy, on seeds drawn from a fixed RNG (ray_unlearn/platform/continual.py); writes
        continual.md, continual.json, integrity.png and heatmap.png; --tiny: 3 requests, 2 strategies;
        --single: each request alone on the base model instead (single.md, single.json)
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


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="config override key=value")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--samples", type=int, default=16, help="images for the sampling rate (and --scaling)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd sampling (loop benchmark)")
    ap.add_argument("--suite", choices=["gpu"], default=None, help="run a prepared suite ('gpu')")
    ap.add_argument("--tiny", action="store_true", help="--suite gpu on a tiny UNet on CPU (seconds; the tests run it)")
    ap.add_argument("--sampler-agreement", action="store_true", help="the fast solver vs DDIM 50 agreement study")
    ap.add_argument("--fast-steps", type=int, default=20, help="steps of the fast solver (DPM-Solver++ 2M)")
    ap.add_argument("--scaling", action="store_true", help="verification sampling over Ray workers")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (--scaling)")
    ap.add_argument("--search", action="store_true", help="benchmark the Pareto search instead (minutes to an hour on CPU)")
    ap.add_argument("--trials", type=int, default=16, help="trials per search (--search)")
    ap.add_argument("--out", default=None, help="where results go (--search: runs/bench-search; --suite: gpu_suite.json; "
                                                "--sampler-agreement: runs/bench-agreement)")
    ap.add_argument("--table", action="store_true", help="the paper's Table I on the demo model (hours on CPU; --tiny: seconds)")
    ap.add_argument("--targets", type=int, default=8, help="target seeds from the fixed RNG (--table)")
    ap.add_argument("--presets", nargs="+", default=None, help="presets to run every method at (--table)")
    ap.add_argument("--arm", dest="arms", action="append", default=[],
                    help="an extra arm LABEL=METHOD@PRESET[,key=value...] (--table; repeatable; with --arm only "
                         "the given arms run unless --presets is given too)")
    ap.add_argument("--rng-seed", type=int, default=None, help="draw the targets from another fixed RNG (--table, "
                                                              "--continual; 1107: the seeds the demo defaults are tuned on)")
    ap.add_argument("--budget-minutes", type=float, default=None, help="start no new run after this long; "
                                                                       "rerun the same command to finish (--table, "
                                                                       "--continual)")
    ap.add_argument("--continual", action="store_true", help="many requests in a row through the processor, per "
                                                            "continual strategy (hours on CPU; --tiny: under a minute)")
    ap.add_argument("--requests", type=int, default=None, help="requests in a row from the fixed RNG (--continual; "
                                                               "default 20, --single 8, --tiny 3)")
    ap.add_argument("--single", action="store_true", help="--continual: each request alone on the base model "
                                                         "(single-request integrity over the drawn seeds)")
    ap.add_argument("--strategies", nargs="+", default=None, help="continual strategies (--continual; default all: "
                                                                  "sequential anchored joint merge; --tiny the first 2)")
    ap.add_argument("--json", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> dict:
    a = parser().parse_args(argv)
    if a.table:
        from ray_unlearn.table import TABLE_RNG_SEED, TINY_SETS, TableOptions, default_arms, parse_arm, run_table

        sets = (*(TINY_SETS if a.tiny else ()), *a.sets)
        presets = a.presets if a.presets is not None else ([] if a.arms else ["paper"])
        try:
            arms = [*default_arms(tuple(presets)), *map(parse_arm, a.arms)]
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
        res = run_table(TableOptions(n_targets=a.targets, arms=arms, sets=sets,
                                     rng_seed=TABLE_RNG_SEED if a.rng_seed is None else a.rng_seed,
                                     out=Path(a.out or "runs/table"), progress=not a.json,
                                     budget_s=None if a.budget_minutes is None else 60 * a.budget_minutes))
        if not a.json:
            print((Path(a.out or "runs/table") / "table.md").read_text())
            return res
    elif a.continual:
        from ray_unlearn.bench.continual import STRATEGIES, ContinualError
        from ray_unlearn.config import ConfigError
        from ray_unlearn.platform.continual import ContinualOptions, run_continual

        if not a.json:  # the processor's per-request lines (figures, gates) during an hours-long run
            from ray_unlearn.cli import setup_logging

            setup_logging()
        strategies = list(a.strategies or (STRATEGIES[:2] if a.tiny else STRATEGIES))
        out = Path(a.out or "runs/bench-continual")
        try:
            res = run_continual(ContinualOptions(
                n_requests=a.requests or (3 if a.tiny else 8 if a.single else 20), strategies=strategies, out=out,
                tiny=a.tiny, single=a.single, sets=tuple(a.sets), progress=not a.json, rng_seed=a.rng_seed,
                budget_s=None if a.budget_minutes is None else 60 * a.budget_minutes))
        except (ContinualError, ConfigError) as err:  # bad flags or settings: checked before any request
            raise SystemExit(f"error: {err}") from None
        if not a.json:
            from ray_unlearn.bench.continual import print_summary

            print((out / ("single.md" if a.single else "continual.md")).read_text())
            print_summary(res["summary"], single=a.single)
            return res
    elif a.search:
        from ray_unlearn.platform.search_bench import run_search_benchmark

        res = run_search_benchmark(trials=a.trials, out=a.out or "runs/bench-search", progress=not a.json)
    elif a.suite == "gpu":
        from ray_unlearn.bench.gpu_suite import run_gpu_suite, table

        res = run_gpu_suite(tiny=a.tiny, out=a.out or "gpu_suite.json", progress=not a.json)
        if not a.json:
            _print_table("GPU suite" + (" (--tiny, CPU)" if a.tiny else ""), table(res))
            return res
    elif a.sampler_agreement:
        from ray_unlearn.bench.agreement import run_sampler_agreement, table
        from ray_unlearn.config import load_config

        res = run_sampler_agreement(load_config(a.config, a.sets), fast_steps=a.fast_steps,
                                    out=a.out or "runs/bench-agreement", progress=not a.json)
        if not a.json:
            _print_table("Sampler agreement", table(res))
            return res
    elif a.scaling:
        from ray_unlearn.platform.scaling import run_scaling
        from ray_unlearn.config import load_config

        res = run_scaling(load_config(a.config, a.sets), workers=a.workers, n_samples=a.samples)
    else:
        from ray_unlearn.bench import run_benchmark
        from ray_unlearn.config import load_config

        res = run_benchmark(steps=a.steps, n_samples=a.samples, cfg=load_config(a.config, a.sets),
                            compile=a.compile, fast_steps=a.fast_steps)
    print(json.dumps(res, indent=2) if a.json else "\n".join(f"{k:>34}: {v}" for k, v in res.items()))
    return res


def _print_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("figure")
    t.add_column("value")
    for k, v in rows:
        t.add_row(k, v)
    Console(width=160).print(t)


if __name__ == "__main__":
    main()
