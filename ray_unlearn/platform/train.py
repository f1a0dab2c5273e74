"""Ray Train around the engine: data-parallel unlearning with checkpoints and fault tolerance.

Each worker runs the engine's phases (`prepare` -> `train` -> on rank 0: save, `judge`,
`write_outputs`). Ray is only here; the engine is unchanged.

Why an explicit all-reduce and not DDP: the loop computes the forget and the remember gradients
separately and then combines them with gradient surgery (a projection, which is not linear).
Every worker must project the same *global* gradients to take the same step, so the two
gradient lists are averaged across workers *before* surgery, through the loop's `reduce_grads`
hook. DDP reduces after backward, i.e. it would average gradients that each worker had already
projected locally: a different (and worker-dependent) step.

Ray Train V2 (the default in Ray 2.60) rules this module relies on:
- `ray.train.report` is a barrier: every worker calls it the same number of times. Workers other
  than rank 0 report metrics with `checkpoint=None`; only rank 0's metrics are kept.
- `ray.train.get_checkpoint()` returns the latest reported checkpoint when the worker group is
  restarted after a failure (`FailureConfig(max_failures)`), or when a run with the same name
  and storage path is started again.
- The controller takes one report per worker per poll (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`,
  2 s): a report blocks until the previous one was taken, so workers report at checkpoints only.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

import ray.train
import ray.train.torch
from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ray_unlearn.config import UnlearnConfig
from ray_unlearn.engine import Reference, judge, prepare, train, write_outputs
from ray_unlearn.evaluate import integrity_seeds
from ray_unlearn.hashing import content_hash
from ray_unlearn.platform.models import with_local_model
from ray_unlearn.storage import open_store, s3_endpoint

logger = logging.getLogger(__name__)

STATE_FILE = "loop_state.pt"


class TrainingFailed(RuntimeError):
    """The run failed on every attempt (`max_failures` restarts spent); the message says why."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def make_allreduce(world_size: int):
    """`reduce_grads` for the loop: the mean over workers of a list of gradients, in one call."""

    def reduce_grads(grads: list[torch.Tensor]) -> list[torch.Tensor]:
        # one flat fp32 buffer: a single collective per gradient list instead of one per tensor
        flat = torch.cat([g.detach().reshape(-1).float() for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world_size)
        out, offset = [], 0
        for g in grads:
            n = g.numel()
            out.append(flat[offset:offset + n].view_as(g).to(g.dtype))
            offset += n
        return out

    return reduce_grads


def broadcast_parameters(params: list[torch.Tensor], src: int = 0) -> None:
    """Start every worker from rank 0's trainable weights (LoRA init is random), as DDP does."""
    with torch.no_grad():
        flat = torch.cat([p.detach().reshape(-1).float() for p in params])
        dist.broadcast(flat, src=src)
        offset = 0
        for p in params:
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p).to(p.dtype))
            offset += n


def param_checksum(params: list[torch.Tensor]) -> float:
    """A position-sensitive sum of the trainable weights: equal on workers that are in sync."""
    total = 0.0
    for i, p in enumerate(params):
        w = torch.arange(1, p.numel() + 1, dtype=torch.float64, device=p.device) / p.numel()
        total += (i + 1) * float((p.detach().reshape(-1).double() * w).sum())
    return total


def _gather(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _load_state(checkpoint: Checkpoint | None, rank: int) -> dict | None:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        path = Path(d) / STATE_FILE
        if not path.is_file():
            return None
        state = torch.load(path, map_location="cpu", weights_only=True)
    per_rank = state.pop("rng_per_rank", None)
    if per_rank is not None and rank < len(per_rank):
        state["rng"] = per_rank[rank]  # each worker resumes its own batch/noise stream
    return state


def _load_reference(spec: dict | None) -> Reference | None:
    """The search's shared base outputs, read from object storage (every node can reach it)."""
    if not spec:
        return None
    store = open_store(spec["store"], endpoint_url=spec.get("endpoint_url"))
    return Reference.from_bytes(store.get_bytes(spec["key"]))


def sharded_integrity_samples(prep, rank: int, world: int) -> torch.Tensor | None:
    """The unlearned model's integrity samples, each worker sampling every world-th seed; the
    shards are gathered on rank 0 in seed order (None elsewhere). Evaluation, not training, sets
    time-to-hotfix on a real model, so every worker's device takes part."""
    fam = prep.family
    seeds = integrity_seeds(prep.cfg.eval)
    mine = seeds[rank::world]
    local = fam.generate(fam.initial_noise(mine)) if mine else None
    shards = _gather(local, world)
    if rank != 0:
        return None
    out = [None] * len(seeds)
    for r, shard in enumerate(shards):
        for j, img in zip(range(r, len(seeds), world), shard if shard is not None else []):
            out[j] = img
    return torch.stack(out)


def _maybe_fail(config: dict, rank: int, step: int) -> None:
    """Fault injection for tests and drills: exit hard once, at a given step, on a given rank.

    `{"step": k, "rank": r, "marker": path}`: the marker file makes it happen once across
    restarts. Ray Train registers a reported checkpoint only when its controller next polls the
    workers (every 2 s), and a worker that dies before that poll's answer reaches the controller
    takes its last checkpoint with it. So the dying rank first waits for
    `ray.train.get_all_reported_checkpoints` (public API: it blocks until the controller has
    processed every report this worker made) and writes the registered steps into the marker:
    the restart then resumes from the last checkpoint before step k, every time.
    """
    spec = config.get("fail_once")
    if not spec or step != spec["step"] or rank != spec.get("rank", 0) or Path(spec["marker"]).exists():
        return
    try:
        registered = ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=300)
        steps = sorted(int(c.metrics["step"]) for c in registered if "step" in c.metrics)
    except Exception as err:  # a drill that cannot confirm still dies, and says so in its marker
        logger.warning("fault drill: could not confirm the registered checkpoints (%s: %s)", type(err).__name__, err)
        steps = None
    Path(spec["marker"]).write_text(json.dumps({"failed_at_step": step, "registered_checkpoint_steps": steps}) + "\n")
    os._exit(1)


def _summary(result: dict) -> dict:
    sscd = [r["sscd_unlearned"] for r in result.get("targets", []) if r.get("sscd_unlearned") is not None]
    return {
        "forgotten": bool(result.get("all_forgotten")),
        "sscd": max(sscd) if sscd else None,
        "integrity_ssim": result.get("integrity", {}).get("ssim"),
        "fid": result.get("integrity", {}).get("fid"),
        "passed": bool(result.get("passed")),
    }


def train_loop_per_worker(config: dict) -> dict | None:
    """The Ray Train worker function. `config["unlearn"]` is an `UnlearnConfig` as a dict."""
    t0 = time.perf_counter()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    every = max(1, int(config.get("checkpoint_every", 10)))

    # an s3:// model is downloaded on each node (once: the cache is shared by its workers)
    cfg = with_local_model(UnlearnConfig.model_validate(config["unlearn"]))
    device = ray.train.torch.get_device()
    # every worker draws its own batches, timesteps and noises (seed + rank): the averaged
    # gradient is that of a world_size times larger batch
    train_cfg = cfg.train.model_copy(update={"device": str(device), "seed": cfg.train.seed + rank})
    cfg = cfg.model_copy(update={"train": train_cfg})

    reference = _load_reference(config.get("reference"))
    # rank 0 fills the on-disk SampleCache first, so the base outputs are generated once
    if rank == 0:
        prep = prepare(cfg, reference=reference)
    if _distributed():
        dist.barrier()
    if rank != 0:
        prep = prepare(cfg, reference=reference)
    if _distributed():
        broadcast_parameters(prep.family.trainable_parameters())

    state = _load_state(ray.train.get_checkpoint(), rank)
    start_step = 0 if state is None else int(state["step"])
    steps = cfg.train.steps
    history: list[dict] = []

    def on_step(loop, logs: dict, step: int) -> None:
        # Every step goes into the history (history.json, MLflow per-step metrics); Ray hears only
        # at checkpoints: the controller takes one report per poll (every 2 s), so a report per
        # step would hold a 0.5 s step to 2 s.
        history.append({"step": step, **logs})
        if step % every == 0 and step < steps:
            metrics = {**logs, "step": step, "resumed_from_step": start_step}
            rngs = _gather(loop.gen.get_state(), world)  # collective: every rank takes part
            if rank == 0:
                with tempfile.TemporaryDirectory() as d:
                    torch.save({**loop.state_dict(), "rng_per_rank": rngs}, Path(d) / STATE_FILE)
                    ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
            else:
                ray.train.report(metrics, checkpoint=None)
        _maybe_fail(config, rank, step)

    t_train = time.perf_counter()
    loop = train(prep, reduce_grads=make_allreduce(world) if world > 1 else None, state=state,
                 progress=False, on_step=on_step, shard=(rank, world))
    train_seconds = time.perf_counter() - t_train

    checksums = _gather(param_checksum(loop.params), world)
    rngs = _gather(loop.gen.get_state(), world)
    integrity_new = sharded_integrity_samples(prep, rank, world)
    final = {"step": loop.step_count, "resumed_from_step": start_step, "param_checksums": checksums,
             "world_size": world}
    if rank != 0:
        ray.train.report(final, checkpoint=None)
        return None

    out_dir = Path(config["out_dir"]) if config.get("out_dir") else Path(tempfile.mkdtemp(prefix="ru-out-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    hotfix = prep.family.save(out_dir / "hotfix")
    result, target_new, integrity_new = judge(prep, progress=False, integrity_new=integrity_new)
    (out_dir / "history.json").write_text(json.dumps(history) + "\n")
    report = write_outputs(
        prep, out_dir, result, target_new, integrity_new, hotfix, time.perf_counter() - t0,
        {"train_seconds": round(train_seconds, 2), "steps": steps, "world_size": world,
         "resumed_from_step": start_step},
    )
    torch.save({**loop.state_dict(), "rng_per_rank": rngs}, out_dir / STATE_FILE)
    final.update(_summary(result))
    # SYNC upload (the default) copies the folder and keeps it: out_dir must stay where it is
    ray.train.report(final, checkpoint=Checkpoint.from_directory(str(out_dir)),
                     delete_local_checkpoint_after_upload=False)
    return {"out_dir": str(out_dir), "hotfix": hotfix, "report": report, **_summary(report)}


def run_name(cfg: UnlearnConfig, num_workers: int) -> str:
    """Deterministic: the same request on the same scale resumes the same run."""
    return f"unlearn-{cfg.method.name}-{content_hash(cfg.model_dump(mode='json'), num_workers)[:12]}"


def ray_storage(storage: str, endpoint_url: str | None = None):
    """(storage_path, storage_filesystem) for Ray's RunConfig: a local folder, or s3:// through
    pyarrow with the S3-compatible endpoint (MinIO, a test server) when one is configured."""
    if not storage.startswith("s3://"):
        return str(Path(storage.removeprefix("file://")).expanduser().resolve()), None
    endpoint = s3_endpoint(endpoint_url)
    if not endpoint:
        return storage, None  # AWS itself: pyarrow resolves the region and credentials
    import pyarrow.fs

    scheme, _, host = endpoint.partition("://")
    fs = pyarrow.fs.S3FileSystem(endpoint_override=host.rstrip("/") if host else scheme, scheme=scheme if host else "https",
                                 region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))
    return storage[len("s3://"):].rstrip("/"), fs


def storage_uri(path: str, filesystem) -> str:
    """A path Ray returned, as a URI our object store and MLflow understand."""
    return path if filesystem is None or path.startswith("s3://") else f"s3://{path}"


def run_train(cfg: UnlearnConfig, *, num_workers: int = 1, use_gpu: bool = False, storage_path: str,
              name: str | None = None, max_failures: int = 2, cpu_per_worker: float = 0.99,
              checkpoint_every: int = 10, loop_config: dict | None = None,
              endpoint_url: str | None = None) -> dict:
    """One unlearning run on Ray Train; returns the final metrics and where the results are.

    `storage_path`: a local folder or s3://bucket/prefix (checkpoints, hotfix and report land there).
    `cpu_per_worker` below 1: on a small machine whole CPUs per worker (plus the controller)
    can leave the run waiting for resources forever.
    `loop_config`: extra keys for the worker function (`fail_once` for fault drills, `reference`
    for a search's shared base outputs).
    """
    name = name or run_name(cfg, num_workers)
    path, filesystem = ray_storage(storage_path, endpoint_url)
    logger.info("Ray Train run %s: %d %s worker(s), %d steps, storage %s", name, num_workers,
                "GPU" if use_gpu else "CPU", cfg.train.steps, storage_path)
    local = filesystem is None and "://" not in path
    train_config = {
        "unlearn": cfg.model_dump(mode="json"),
        "checkpoint_every": checkpoint_every,
        # on local storage the outputs are written under the run directory (and also kept in the
        # final checkpoint); on remote storage only the final checkpoint carries them
        "out_dir": str(Path(path) / name / "output") if local else None,
        **(loop_config or {}),
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=train_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpu_per_worker}),
        run_config=RunConfig(name=name, storage_path=path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as err:  # raised once max_failures is spent
        raise TrainingFailed(str(err)) from err
    ret = result.return_value or {}
    checkpoint = storage_uri(result.checkpoint.path, filesystem) if result.checkpoint else None
    # the report as stored: beside the local run's outputs, or (remote storage: out_dir was a
    # worker's temp dir) in the final checkpoint
    if local and ret.get("out_dir"):
        report_uri = str(Path(ret["out_dir"]) / "report.json")
    else:
        report_uri = f"{checkpoint}/report.json" if checkpoint else None
    return {
        **result.metrics,
        "name": name,
        "run_path": storage_uri(result.path, filesystem),
        "checkpoint": checkpoint,
        "out_dir": ret.get("out_dir"),
        # the hotfix as stored: a folder inside the final checkpoint (local path or s3:// URI)
        "hotfix": f"{checkpoint}/hotfix" if checkpoint else None,
        "report": ret.get("report"),  # the report itself (a dict)
        "report_uri": report_uri,
    }
