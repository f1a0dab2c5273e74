"""Ray Tune's Pareto search: which settings forget the target while changing the model least.

The driver (`run_search`):
  1. validates the search space (search_spaces/*.yaml) against the config before any trial;
  2. samples the base model's shared outputs ONCE (remember set, integrity samples at full size,
     the targets and the base's outputs for them: `engine.reference_outputs`) and puts them in
     object storage, where every trial on every node reads them;
  3. opens one MLflow parent run and runs Tune: OptunaSearch with two objectives (forget: min, the target's SSCD
     relative to the threshold and to the unrelated outputs, see OBJECTIVES;
     integrity SSIM: max; Tune's own TuneConfig(metric=...) takes no lists, OptunaSearch does).
     Each trial is a Tune function trainable that launches a Ray Train run (Train V2: the
     trainer runs *inside* the trial, `Tuner(trainer)` is gone) and asks for 0.01 CPU itself,
     the workers 0.99 each: whole CPUs for the trial driver deadlock a 2-CPU machine;
  4. scores trials on a proxy integrity set (the first `proxy_integrity` seeds, no FID), then
     re-checks only the front's points at full size and keeps the front of the re-checked figures;
  5. writes pareto.json and pareto.png to storage, MLflow (parent run) and the output folder.
A search is resumable: the same name and storage restore the Tuner (`Tuner.restore`), finished
trials are not rerun, and an interrupted trial's Train run resumes from its checkpoint.
"""

from __future__ import annotations

import json
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from ray_unlearn import pareto
from ray_unlearn.config import UnlearnConfig, load_config
from ray_unlearn.engine import Reference, build_metrics, judge, load_family, prepare, reference_outputs
from ray_unlearn.hashing import content_hash
from ray_unlearn.platform.models import with_local_model
from ray_unlearn.platform.privacy import redact_config
from ray_unlearn.platform.promotion import DEFAULT_MODEL_NAME, version_tags
from ray_unlearn.platform.registry import Registry
from ray_unlearn.platform.tracking import Tracker
from ray_unlearn.platform.train import ray_storage, run_train
from ray_unlearn.search_space import load_space
from ray_unlearn.storage import DEFAULT_STORE, open_store
from ray_unlearn.viz import pareto_plot

logger = logging.getLogger(__name__)

TRIAL_CPU = 0.01  # the trial's own process only waits on its Train run
WORKER_CPU = 0.99
# The forgetting objective measures the target against the unrelated outputs (issue 14): per target
# max(SSCD - threshold, SSCD(base, hotfix) - the unrelated pairs' p10), the worst target's. It is
# below 0 exactly when both the threshold and the specificity rule of evaluate.target_verdict hold,
# so a hotfix that changes every output alike cannot score well however low its target's SSCD.
FORGET = "forget"
OBJECTIVES = {FORGET: "min", "integrity": "max"}


@dataclass
class SearchOptions:
    space: str = "surrogate"  # a search_spaces/ name or a YAML path
    trials: int = 16
    workers: int = 1  # Ray Train workers per trial (one per GPU)
    gpu: bool = False
    proxy_integrity: int | None = 16  # trials score on this many integrity seeds; None: full size
    storage: str = DEFAULT_STORE  # a folder or s3://bucket/prefix
    endpoint_url: str | None = None
    tracking_uri: str | None = None
    experiment: str = "ray-unlearn"
    model_name: str = DEFAULT_MODEL_NAME
    name: str | None = None
    max_concurrent: int | None = None  # default: as many as the cluster's CPUs/GPUs fit
    seed: int = 0
    searcher: str = "optuna"  # "optuna" (multi-objective TPE) or "grid" (the `grid` points, a baseline)
    grid: list[dict] = field(default_factory=list)
    out_dir: str | None = None  # a local copy of pareto.json / pareto.png


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares (pickled to each trial's process by Tune)."""

    name: str  # the search's name: run names, registry idempotency keys
    base: dict  # the base config (`UnlearnConfig` as JSON); a trial applies its sampled params on top
    proxy: int | None  # integrity seeds a trial is scored on; None: full size
    tracking_uri: str
    experiment: str
    parent_run_id: str
    model_name: str  # the registered model that gets one version per trial
    workers: int
    gpu: bool
    ray_storage: str  # where the trials' Ray Train runs keep checkpoints (a folder or s3://)
    reference: dict  # where the shared base outputs are: {"store", "key", "endpoint_url"}
    endpoint_url: str | None = None


def _join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def to_tune(space: dict) -> dict:
    """A loaded search space (`search_space.load_space`) as Ray Tune distributions."""
    make = {"loguniform": tune.loguniform, "uniform": tune.uniform,
            "int": lambda lo, hi: tune.randint(int(lo), int(hi) + 1), "choice": lambda *a: tune.choice(list(a))}
    return {key: make[kind](*args) for key, (kind, args) in space["space"].items()}


def search_name(cfg: UnlearnConfig, opts: SearchOptions, space: dict) -> str:
    """Deterministic: the same search, started again, resumes instead of starting over."""
    key = content_hash(cfg.model_dump(mode="json"), space, opts.trials, opts.workers, opts.proxy_integrity,
                       opts.seed, opts.searcher, opts.grid)
    return f"search-{space['method']}-{key[:10]}"


def _trial_config(base: dict, params: dict, proxy: int | None) -> UnlearnConfig:
    sets = [f"{k}={v}" for k, v in params.items()]
    if proxy is not None:
        sets += [f"eval.n_integrity={proxy}", "eval.fid=false"]
    return load_config(None, sets, base=base)


@contextmanager
def _local(uri: str, filesystem):
    """A stored folder (a Ray checkpoint, local or s3://) as a local directory."""
    if filesystem is None and "://" not in uri:
        yield Path(uri)
        return
    from ray.train import Checkpoint

    path = uri[len("s3://"):] if filesystem is not None and uri.startswith("s3://") else uri
    with Checkpoint(path, filesystem=filesystem).as_directory() as d:
        yield Path(d)


def _point(report: dict, params: dict) -> dict:
    rows = report.get("targets") or []
    sscd = [r["sscd_unlearned"] for r in rows if r.get("sscd_unlearned") is not None]
    th, spec = (report.get("forget_threshold") or {}).get("value"), report.get("specificity") or {}
    slack = [max(r["sscd_unlearned"] - th, -r["margin"]) for r in rows
             if th is not None and r.get("sscd_unlearned") is not None and r.get("margin") is not None]
    return {
        "params": params,
        "sscd": max(sscd) if sscd else None,
        FORGET: round(max(slack), 4) if slack else None,
        "specificity_margin": spec.get("target_margin"),
        "collateral": spec.get("collateral"),
        "integrity": report.get("integrity", {}).get("ssim"),
        "fid": report.get("integrity", {}).get("fid"),
        "forgotten": bool(report.get("all_forgotten")),
        "passed": bool(report.get("passed")),
        "threshold": (report.get("forget_threshold") or {}).get("value"),
        "n_integrity": report.get("integrity", {}).get("n"),
    }


def _trial(config: dict, ctx: TrialContext) -> None:
    """One Tune trial: a Ray Train run of the sampled settings, logged, registered, reported."""
    params = dict(config.get("point") or config)
    trial_id = tune.get_context().get_trial_id()
    cfg = _trial_config(ctx.base, params, ctx.proxy)
    tracker = Tracker(ctx.tracking_uri, ctx.experiment)
    run_id = tracker.start_run(f"trial-{trial_id}", parent_run_id=ctx.parent_run_id,
                               params={**params, "workers": ctx.workers, "method": cfg.method.name},
                               tags={"search": ctx.name, "trial_id": trial_id})
    try:
        out = run_train(cfg, num_workers=ctx.workers, use_gpu=ctx.gpu, storage_path=ctx.ray_storage,
                        name=f"{ctx.name}-{trial_id}", loop_config={"reference": ctx.reference},
                        endpoint_url=ctx.endpoint_url, cpu_per_worker=WORKER_CPU)
        report = out["report"]
        _, filesystem = ray_storage(ctx.ray_storage, ctx.endpoint_url)
        with _local(out["checkpoint"], filesystem) as d:
            tracker.log_history(run_id, json.loads((d / "history.json").read_text()))
            tracker.log_report(run_id, report, d, storage_uri=out["checkpoint"])
        version = Registry(ctx.tracking_uri, ctx.model_name).register(
            out["hotfix"], run_id=run_id, idempotency_key=f"{ctx.name}/{trial_id}",
            tags=version_tags(report, search=ctx.name, trial=trial_id, scored_on=f"proxy n={cfg.eval.n_integrity}",
                              report_uri=f"{out['checkpoint']}/report.json"))
        tracker.end_run(run_id)
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    point = _point(report, params)
    tune.report({**{k: v for k, v in point.items() if k != "params"}, "sscd": point["sscd"] if point["sscd"] is not None else 1.0,
                 FORGET: point[FORGET] if point[FORGET] is not None else 1.0,
                 "integrity": point["integrity"] if point["integrity"] is not None else 0.0,
                 "version": version.version, "hotfix": out["hotfix"], "mlflow_run_id": run_id,
                 "checkpoint": out["checkpoint"]})


def recheck(base: dict, params: dict, hotfix: str, reference: dict, ray_storage_uri: str,
            endpoint_url: str | None = None) -> dict:
    """A front point's hotfix evaluated at full size (all integrity seeds, FID on)."""
    cfg = with_local_model(_trial_config(base, params, None))
    store = open_store(reference["store"], endpoint_url=endpoint_url)
    ref = Reference.from_bytes(store.get_bytes(reference["key"]))
    _, filesystem = ray_storage(ray_storage_uri, endpoint_url)
    checkpoint = hotfix.rsplit("/hotfix", 1)[0]
    with _local(checkpoint, filesystem) as d:
        family = load_family(cfg, str(d / "hotfix"), lora=False)
        prep = prepare(cfg, family, surrogates=False, reference=ref)
        result, _, _ = judge(prep, build_metrics(cfg, family.device), progress=False)
    return result


def start_point(cfg: UnlearnConfig, space: dict) -> dict:
    """The config's current value of every searched key, clipped into the searched range."""
    data = cfg.model_dump(mode="json")
    point = {}
    for key, (kind, args) in space["space"].items():
        value = data
        for part in key.split("."):
            value = value[part]
        if kind == "choice":
            value = value if value in args else args[0]
        else:
            value = min(max(value, args[0]), args[1])
            value = int(round(value)) if kind == "int" else float(value)
        point[key] = value
    return point


def _concurrency(opts: SearchOptions) -> int:
    if opts.max_concurrent:
        return opts.max_concurrent
    res = ray.cluster_resources()
    if opts.gpu:
        return max(1, int(res.get("GPU", 0) // opts.workers))
    return max(1, int((res.get("CPU", 1) - TRIAL_CPU) // (WORKER_CPU * opts.workers)))


def _shared_reference(cfg: UnlearnConfig, opts: SearchOptions, store, prefix: str, progress: bool) -> tuple[dict, int]:
    """The base model's shared outputs, sampled once per search (also across resumes) and put in
    the store; (where they are, how many times the base model was sampled now)."""
    key = f"{prefix}/reference.pt"
    passes = 0
    if not store.exists(key):
        ref = reference_outputs(with_local_model(cfg), targets=True, progress=progress)
        store.put_bytes(key, ref.to_bytes())
        passes = ref.cache_hits["base_passes"]
    return {"store": opts.storage, "key": key, "endpoint_url": opts.endpoint_url}, passes


def _parent_run(cfg: UnlearnConfig, opts: SearchOptions, name: str, tracker: Tracker, store, prefix: str) -> str:
    """The search's MLflow parent run, reused when the search resumes."""
    key = f"{prefix}/parent_run.json"
    if store.exists(key):
        return store.get_json(key)["run_id"]
    run_id = tracker.start_run(name, params={"space": opts.space, "trials": opts.trials, "workers": opts.workers,
                                             "proxy_integrity": opts.proxy_integrity, "searcher": opts.searcher,
                                             "config": redact_config(cfg.model_dump(mode="json"))},
                               tags={"search": name, "kind": "search"})
    store.put_json(key, {"run_id": run_id})
    return run_id


def _tuner(cfg: UnlearnConfig, opts: SearchOptions, space: dict, ctx: TrialContext, progress: bool) -> tune.Tuner:
    """A new Tuner, or the interrupted one of the same name restored (finished trials are kept)."""
    ray_uri = _join(opts.storage, "ray")
    trainable = tune.with_resources(tune.with_parameters(_trial, ctx=ctx), {"CPU": TRIAL_CPU})
    path, filesystem = ray_storage(ray_uri, opts.endpoint_url)
    tuner_path = _join(ray_uri, ctx.name) if filesystem is None else _join(path, ctx.name)
    if tune.Tuner.can_restore(tuner_path, storage_filesystem=filesystem):
        logger.info("search %s: resuming the interrupted Tune run", ctx.name)
        return tune.Tuner.restore(tuner_path, trainable, resume_errored=True, storage_filesystem=filesystem)
    if opts.searcher == "grid":
        param_space, search_alg, samples = {"point": tune.grid_search(list(opts.grid))}, None, 1
    else:
        param_space = to_tune(space)
        # the config's own settings go first: the search starts from the known-good point
        search_alg = OptunaSearch(metric=list(OBJECTIVES), mode=list(OBJECTIVES.values()), seed=opts.seed,
                                  points_to_evaluate=[start_point(cfg, space)])
        samples = opts.trials
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search_alg, num_samples=samples,
                                    max_concurrent_trials=_concurrency(opts)),
        run_config=tune.RunConfig(name=ctx.name, storage_path=path, storage_filesystem=filesystem,
                                  verbose=1 if progress else 0),
    )


def _points(results) -> tuple[list[dict], list[str]]:
    """The finished trials as front points, and the errors of the others."""
    points, errors = [], []
    for r in results:
        if r.error is not None or not r.metrics or "version" not in r.metrics:
            errors.append(str(r.error)[:500] if r.error else "no result")
            continue
        m = r.metrics
        params = dict(r.config.get("point") or r.config)
        points.append({"trial": m.get("trial_id"), "params": params, "sscd": m["sscd"], "integrity": m["integrity"],
                       "fid": m.get("fid"), "forgotten": bool(m["forgotten"]), "passed": bool(m["passed"]),
                       "threshold": m.get("threshold"), "version": m["version"], "hotfix": m["hotfix"],
                       FORGET: m.get(FORGET), "specificity_margin": m.get("specificity_margin"),
                       "collateral": m.get("collateral"),
                       "mlflow_run_id": m["mlflow_run_id"], "scored_on": f"proxy n={m.get('n_integrity')}"})
    return points, errors


def _recheck_front(proxy_front: list[dict], ctx: TrialContext, registry: Registry) -> list[dict]:
    """The proxy front's points evaluated at full size (Ray tasks, one per point); their registry
    tags get the full-size figures; the front of the re-checked points."""
    logger.info("search %s: re-checking the %d front point(s) at full size", ctx.name, len(proxy_front))
    task = ray.remote(num_cpus=0 if ctx.gpu else WORKER_CPU, num_gpus=1 if ctx.gpu else 0)(recheck)
    refs = [task.remote(ctx.base, p["params"], p["hotfix"], ctx.reference, ctx.ray_storage, ctx.endpoint_url)
            for p in proxy_front]
    rechecked = []
    for p, result in zip(proxy_front, ray.get(refs)):
        q = {**p, **{k: v for k, v in _point(result, p["params"]).items() if k != "params"},
             "scored_on": f"full n={result['integrity']['n']}",
             "proxy": {"sscd": p["sscd"], FORGET: p.get(FORGET), "integrity": p["integrity"]}}
        for k, v in {**version_tags(result), "scored_on": q["scored_on"]}.items():  # full-size figures replace the proxy's
            registry.client.set_model_version_tag(registry.name, str(q["version"]), k, v)
        rechecked.append(q)
    return pareto.front(rechecked, FORGET)


def _publish(summary: dict, opts: SearchOptions, tracker: Tracker, store, prefix: str) -> None:
    """pareto.json and pareto.png to the store, the MLflow parent run and the output folder; the
    parent run's figures and tags; the parent run ended."""
    points, final, chosen, parent_run_id = summary["trials"], summary["front"], summary["chosen"], summary["mlflow_parent_run_id"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "pareto.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        pareto_plot(tmp / "pareto.png", points, final, 0.0, summary["min_integrity"], chosen,
                    title=f"{summary['search']}: {len(points)} trials, {len(final)} on the front", x=FORGET)
        for f in ("pareto.json", "pareto.png"):
            store.put_bytes(f"{prefix}/{f}", (tmp / f).read_bytes())
            tracker.log_figure(parent_run_id, tmp / f)
            if opts.out_dir:
                Path(opts.out_dir).mkdir(parents=True, exist_ok=True)
                (Path(opts.out_dir) / f).write_bytes((tmp / f).read_bytes())
    tracker.log_metrics(parent_run_id, {"hypervolume": summary["hypervolume"], "front_size": len(final),
                                        "trials_ok": len(points), "base_sampling_passes": summary["base_sampling_passes"]})
    tracker.set_tags(parent_run_id, {"pareto_uri": store.uri(f"{prefix}/pareto.json"),
                                     "chosen_version": str(chosen["version"]) if chosen else ""})
    tracker.end_run(parent_run_id)


def run_search(cfg: UnlearnConfig, opts: SearchOptions, progress: bool = True) -> dict:
    """The whole search; returns the summary written to pareto.json."""
    space = load_space(opts.space)
    cfg = load_config(None, [f"method.name={space['method']}"], base=cfg.model_dump(mode="json")) \
        if cfg.method.name != space["method"] else cfg
    if opts.searcher == "grid" and not opts.grid:
        raise ValueError("searcher='grid' needs the grid points (SearchOptions.grid)")
    if opts.proxy_integrity is not None and opts.proxy_integrity >= cfg.eval.n_integrity:
        opts.proxy_integrity = None  # the proxy would be the full set: no re-check needed
    name = opts.name or search_name(cfg, opts, space)
    store = open_store(opts.storage, endpoint_url=opts.endpoint_url)
    prefix = f"searches/{name}"
    tracker = Tracker(opts.tracking_uri, opts.experiment)
    logger.info("search %s: %d trials of %s over %s", name, opts.trials, space["method"], ", ".join(space["space"]))

    reference, base_passes = _shared_reference(cfg, opts, store, prefix, progress)
    ctx = TrialContext(name=name, base=cfg.model_dump(mode="json"), proxy=opts.proxy_integrity,
                       tracking_uri=tracker.uri, experiment=opts.experiment,
                       parent_run_id=_parent_run(cfg, opts, name, tracker, store, prefix),
                       model_name=opts.model_name, workers=opts.workers, gpu=opts.gpu,
                       ray_storage=_join(opts.storage, "ray", "trials"), reference=reference,
                       endpoint_url=opts.endpoint_url)
    points, errors = _points(_tuner(cfg, opts, space, ctx, progress).fit())

    threshold = next((p["threshold"] for p in points if p.get("threshold") is not None), None)
    proxy_front = pareto.front(points, FORGET)
    final = proxy_front
    if opts.proxy_integrity is not None and proxy_front:
        final = _recheck_front(proxy_front, ctx, Registry(opts.tracking_uri, opts.model_name))
    min_integrity = cfg.eval.min_integrity_ssim
    chosen = pareto.choose(final, min_integrity, FORGET)
    summary = {
        "search": name, "objectives": OBJECTIVES, "space": {k: list(v) for k, v in space["space"].items()},
        "method": space["method"], "trials": points, "errors": errors,
        "front_proxy": proxy_front, "front": final, "chosen": chosen,
        "threshold": threshold, "min_integrity": min_integrity,
        # reference point: the objective's boundary 0 (forgotten, specifically) and integrity 0
        "hypervolume_proxy": round(pareto.hypervolume(points, 0.0, x=FORGET), 6),
        "hypervolume": round(pareto.hypervolume(final, 0.0, x=FORGET), 6),
        "base_sampling_passes": base_passes, "mlflow_parent_run_id": ctx.parent_run_id,
        "tracking_uri": tracker.uri, "storage": opts.storage, "options": asdict(opts),
    }
    _publish(summary, opts, tracker, store, prefix)
    summary["pareto_uri"] = store.uri(f"{prefix}/pareto.json")
    return summary
