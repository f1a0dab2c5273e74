"""The continual benchmark (`jobs/benchmark.py --continual`): many deletion requests in a row,
through the real queue and processor, once per continual strategy, on the same drawn seeds.

Per strategy, a fresh store and MLflow registry under OUT/<strategy>/. Each request is submitted
as a user would (the base model's output for its seed, rendered as `ray-unlearn sample` does, as a
PNG, plus the seed) and processed by `Processor(limit=1, max_attempts=1)` with the overrides
`continual.strategy=<s>` and any `--set` values: one batch per request, one version per request
that passes. One attempt each: a request that a gate would return to pending (integrity, a
regression) is given up by the next run's triage and ends failed with the gate's reason, so the
next request is the next drawn seed, never a retry.

After each request a row (`ray_unlearn.bench.continual`) records: the result (done / failed /
not_produced, and every processor result on the way, e.g. returned), its reason and figures (SSCD
base -> new, the request's own integrity SSIM, training seconds), the serving version's integrity
SSIM / LPIPS / FID against the base, the re-verification of every done request on it (SSCD /
threshold), and the wall time. Rows go to OUT/<strategy>/rows.json after every request, so a
stopped run resumes where it stopped (the request it was processing is tried again once its lease
runs out: the stopped run's claim is no try); then continual.json, continual.md, integrity.png and
heatmap.png.

`single=True` (`--single`): each request alone on the base model instead, a fresh store and
registry per seed (OUT/<strategy>/single-<seed>/): the single-request targets (mean integrity
SSIM, none below the bound, every target forgotten), written to single.json and single.md.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ray_unlearn.bench.continual import (
    CONTINUAL_RNG_SEED, STRATEGIES, ContinualError, check_strategies, continual_seeds, heatmaps, integrity_plot, load_rows,
    render_markdown, save_rows, summarize,
)
from ray_unlearn.config import ConfigError, load_config
from ray_unlearn.table import TINY_SETS as _TABLE_TINY

log = logging.getLogger(__name__)

# what `--tiny` adds (`tiny_sets`): a tiny random UNet built in code (the GPU suite's), the table's tiny
# settings (table.TINY_SETS), a learning rate that moves it in 2 steps, and gates loosened as the demo
# batch test's integrity-only run does (any clear move of the target counts as forgotten; no
# specificity or collateral rule, no accept margin). --tiny runs every part of the code (submit, process, versions,
# re-verification, the table and pictures) in seconds; its figures measure nothing
TINY_SETS = (*_TABLE_TINY, "train.device=cpu", "train.lr=0.05", "eval.threshold=fixed",
             "eval.fixed_threshold=0.995", "eval.min_integrity_ssim=0.0", "eval.specificity_percentile=null",
             "eval.max_collateral=1.0", "continual.accept_margin=0")
MAX_RUNS_PER_REQUEST = 4  # the run that tries it, one that gives up a returned request, leases of a stopped run


@dataclass
class ContinualOptions:
    n_requests: int = 20
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    sets: tuple[str, ...] = ()  # over the defaults, for every strategy (e.g. eval.n_integrity=64)
    out: Path = Path("runs/bench-continual")
    progress: bool = True
    budget_s: float | None = None  # start no new request after this long; rerun the same command to finish
    # a stopped run's claimed request is free again this long after it stopped; renewed every third of it
    lease_seconds: float = 300.0
    tiny: bool = False  # a tiny UNet and tiny settings (`tiny_sets`) under opts.sets: seconds on CPU
    single: bool = False  # each request alone on the base model (a fresh store per seed): issue 12's single requests
    rng_seed: int | None = None  # None: the benchmark's (CONTINUAL_RNG_SEED); table.TUNING_RNG_SEED for a tuning run


def tiny_sets(out: Path) -> tuple[str, ...]:
    """--tiny's settings, with its model: the GPU suite's tiny UNet (random weights, seed 0), saved
    once as a diffusers DDPM pipeline under OUT/tiny-model."""
    folder = Path(out).resolve() / "tiny-model"
    if not (folder / "model_index.json").is_file():
        from diffusers import DDPMPipeline

        from ray_unlearn.bench.gpu_suite import build_scheduler, build_unet

        DDPMPipeline(unet=build_unet(tiny=True), scheduler=build_scheduler()).save_pretrained(folder)
    return (f"model.path={folder}", f"cache_dir={folder.parent / 'cache'}", *TINY_SETS)


def strategy_overrides(strategy: str, sets: tuple[str, ...] = ()) -> list[str]:
    """The processor overrides that select `strategy`, checked against this checkout's config. A
    config without the `continual` section runs today's processor, which is `sequential`; any
    other strategy then stops here, before any request, naming what is missing."""
    try:
        load_config(None, [f"continual.strategy={strategy}", *sets])
        return [f"continual.strategy={strategy}", *sets]
    except ConfigError as err:
        if "continual" not in str(err):
            raise
        try:
            load_config(None, ["continual.strategy=sequential"])
        except ConfigError:
            if strategy == "sequential":  # no such setting yet: today's processor is the sequential strategy
                load_config(None, list(sets))
                return list(sets)
            raise ConfigError(f"strategy {strategy!r}: this checkout's config has no `continual.strategy` setting, "
                              "so only today's processor ('sequential') can run; use --strategies sequential") from None
        raise ConfigError(f"strategy {strategy!r}: the config refuses it: {err}") from None


def _paths(out: Path, strategy: str, single_seed: int | None = None) -> dict:
    """Where a strategy's run lives: OUT/<strategy>/ (its store, registry and rows.json); with
    --single, one store and registry per seed under OUT/<strategy>/single-<seed>/ and single.json."""
    root = out / strategy
    where = root if single_seed is None else root / f"single-{single_seed}"
    return {"root": where, "store": where / "store", "tracking": f"sqlite:///{(where / 'mlflow.db').resolve()}",
            "rows": root / ("rows.json" if single_seed is None else "single.json")}


def _pictures(sets: tuple[str, ...], seeds: list[int], folder: Path) -> dict[int, Path]:
    """The base model's output for each seed as a PNG (what a requester sends), rendered once."""
    from ray_unlearn.engine import render_seeds

    import json

    cfg = load_config(None, list(sets))
    made_by = {"model": cfg.model.path, "revision": cfg.model.revision, "sampler": cfg.sampler.model_dump(mode="json")}
    stamp = folder / "rendered_by.json"
    if stamp.is_file() and json.loads(stamp.read_text()) != made_by:
        raise ContinualError(f"the request pictures in {folder} were rendered by {json.loads(stamp.read_text())}, not "
                         f"{made_by}: give a new --out (or the same settings) so that no request is another model's")
    paths = {s: folder / f"seed-{s}.png" for s in seeds}
    missing = [s for s in seeds if not paths[s].is_file()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps(made_by, indent=2) + "\n")
        render_seeds(cfg, cfg.model.path, missing, folder)
    return paths


def _wait_for_lease(rec) -> None:
    """A request a stopped run still holds: wait until its lease runs out (OUT's lease is short)."""
    left = (rec.lease_expires_at - datetime.now(timezone.utc)).total_seconds()
    if left > 0:
        log.info("%s is claimed by %s (a stopped run?) until %s: waiting %.0f s", rec.id, rec.lease_holder,
                 rec.lease_expires_at, left)
        time.sleep(left + 1.0)


def run_request(strategy: str, i: int, seed: int, picture: Path, overrides: list[str], paths: dict,
                lease_seconds: float) -> dict:
    """Submit one request, process it until it is settled, and record the row."""
    from ray_unlearn.platform.tracking import Registry
    from ray_unlearn.requests.lineage import Lineage
    from ray_unlearn.requests.models import TERMINAL
    from ray_unlearn.requests.process import Processor
    from ray_unlearn.requests.queue import Queue
    from ray_unlearn.storage import open_store

    store = open_store(paths["store"])
    queue = Queue(store)
    rec, _ = queue.submit(picture, seed=seed, note=f"continual benchmark: request {i}, strategy {strategy}")
    outcomes = []
    for _ in range(MAX_RUNS_PER_REQUEST):
        rec = queue.get(rec.id)
        if rec.state in TERMINAL:
            break
        if rec.state == "claimed":
            _wait_for_lease(rec)
        # one try per request; a claim a stopped run left behind was no try of the method's, so it does
        # not count (with max_attempts=1 the processor would give the request up unseen)
        out = Processor(str(paths["store"]), tracking_uri=paths["tracking"], limit=1, max_attempts=rec.attempts + 1,
                        overrides=overrides, lease_seconds=lease_seconds).run()
        outcomes.append(out)
    rec = queue.get(rec.id)
    registry = Registry(paths["tracking"])
    serving = registry.serving()
    made = next((o for o in outcomes if o.status == "promoted" and o.version is not None), None)
    if made is not None:
        integrity, reverified = made.integrity or {}, made.reverified
    elif serving is not None:  # the model did not change: the serving version's committed figures
        manifest = Lineage(store, registry, "continual-benchmark").manifest(serving.tags["batch"])
        integrity, reverified = manifest.get("integrity") or {}, manifest.get("reverified") or []
    else:
        integrity, reverified = {}, []
    mine = [r for o in outcomes for r in o.requests if r["id"] == rec.id]
    ev = rec.evidence or {}
    request = {"sscd_base": ev.get("sscd_base"), "sscd_new": ev.get("sscd_new"),
               "integrity_ssim": (ev.get("integrity_after_request") or {}).get("ssim"),
               "threshold": (ev.get("threshold") or {}).get("value")}
    for src in [ev.get("last_attempt") or {}, *mine]:  # a failed / returned attempt's figures
        for key, name in (("sscd_base", "sscd_base"), ("sscd_new", "sscd_new"), ("integrity_ssim", "integrity_ssim")):
            if src.get(key) is not None and request.get(name) is None:
                request[name] = src[key]
    result = rec.state if rec.state in TERMINAL else "returned"
    return {
        "i": i, "seed": seed, "strategy": strategy, "request_id": rec.id, "result": result,
        "reason": rec.reason or next((r["reason"] for r in reversed(mine) if r.get("reason")), None),
        "processor": [{"result": r["result"], "reason": r.get("reason")} for r in mine],
        "statuses": [o.status for o in outcomes],
        "request": request,
        "train_seconds": ev.get("train_seconds") if result == "done" else None,
        # what the attempt trained for, done or refused (a refused one's is in its last_attempt)
        "attempt_train_seconds": ev.get("train_seconds", (ev.get("last_attempt") or {}).get("train_seconds")),
        "steps_trained": ev.get("steps_trained", (ev.get("last_attempt") or {}).get("steps_trained")),
        "weights_of_step": ev.get("weights_of_step", (ev.get("last_attempt") or {}).get("weights_of_step")),
        "new_version": made is not None,
        "version": serving.version if serving is not None else None,
        "model": {k: integrity.get(k) for k in ("ssim", "lpips", "fid", "n", "collateral")} if serving is not None else None,
        "reverified": [{k: v.get(k) for k in ("id", "sscd", "threshold", "forgotten", "artifact", "why")}
                       for v in reverified],
        "n_done": len(queue.list("done")),
        "n_forgotten": sum(v.get("forgotten") is True for v in reverified),
        "wall_seconds": round(sum(o.wall_seconds for o in outcomes), 2) if outcomes else None,
        "recovered": not outcomes,  # settled by a stopped run before its row was written
    }


def run_continual(opts: ContinualOptions) -> dict:
    """Every (request, strategy) not yet recorded under OUT, requests outer (a stopped run has every
    strategy on its first requests), then the table and the pictures."""
    from tqdm.auto import tqdm

    out = Path(opts.out)
    strategies = check_strategies(list(opts.strategies))
    rng_seed = CONTINUAL_RNG_SEED if opts.rng_seed is None else opts.rng_seed
    seeds = continual_seeds(opts.n_requests, rng_seed)
    out.mkdir(parents=True, exist_ok=True)
    sets = (*(tiny_sets(out) if opts.tiny else ()), *opts.sets)
    overrides = {s: strategy_overrides(s, sets) for s in strategies}  # all checked before any request
    paths = {s: _paths(out, s, -1 if opts.single else None) for s in strategies}  # (the rows file)
    runs = {}
    for s in strategies:
        saved = load_rows(paths[s]["rows"], list(sets))
        recorded = [r["seed"] for r in saved]
        if recorded != seeds[: len(recorded)]:
            raise ContinualError(f"{paths[s]['rows']} holds seeds {recorded}, not the first draws {seeds[:len(recorded)]}: "
                             "it was written by another benchmark; use a new --out")
        runs[s] = saved
    pictures = _pictures(sets, seeds, out / "requests")
    todo = [(i, seed, s) for i, seed in enumerate(seeds, 1) for s in strategies]
    bar = tqdm(todo, desc=f"{'single' if opts.single else 'continual'} (request x strategy)", disable=not opts.progress)
    started, stopped = time.monotonic(), False
    for i, seed, s in bar:
        if any(r["seed"] == seed for r in runs[s]):
            continue  # recorded by an earlier call
        if stopped or (opts.budget_s is not None and time.monotonic() - started > opts.budget_s):
            stopped = True  # out of time: the rest stays "not run" (rerun the same command to go on)
            continue
        bar.set_postfix_str(f"{s} #{i} seed {seed}")
        where = _paths(out, s, seed) if opts.single else paths[s]
        row = run_request(s, i, seed, pictures[seed], overrides[s], where, opts.lease_seconds)
        runs[s].append(row)
        save_rows(paths[s]["rows"], s, runs[s], list(sets), rng_seed)
        log.info("%s #%d seed %d: %s; serving v%s SSIM %s, %d/%d done still forgotten (%ss)", s, i, seed,
                 row["result"], row["version"], (row["model"] or {}).get("ssim"), row["n_forgotten"], row["n_done"],
                 row["wall_seconds"])
    if opts.single:
        return write_single(out, seeds, runs, list(sets), rng_seed)
    return write_outputs(out, seeds, runs, list(sets), rng_seed)


def write_single(out: Path, seeds: list[int], runs: dict[str, list[dict]], sets: list[str],
                 rng_seed: int = CONTINUAL_RNG_SEED) -> dict:
    import json

    from ray_unlearn.bench.continual import render_single, summarize_single

    summaries = {s: summarize_single(rows, len(seeds)) for s, rows in runs.items()}
    res = {"seeds": seeds, "rng_seed": rng_seed, "sets": sets, "summary": summaries, "runs": runs}
    (out / "single.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "single.md").write_text(render_single(seeds, runs, summaries, sets, rng_seed))
    return res


def write_outputs(out: Path, seeds: list[int], runs: dict[str, list[dict]], sets: list[str],
                  rng_seed: int = CONTINUAL_RNG_SEED) -> dict:
    import json

    summaries = {s: summarize(rows, len(seeds)) for s, rows in runs.items()}
    min_ssim = load_config(None, list(sets)).eval.min_integrity_ssim
    res = {"seeds": seeds, "rng_seed": rng_seed, "sets": sets, "summary": summaries, "runs": runs}
    (out / "continual.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "continual.md").write_text(render_markdown(seeds, runs, summaries, sets, rng_seed))
    integrity_plot(out / "integrity.png", runs, min_ssim)
    heatmaps(out / "heatmap.png", runs)
    return res
