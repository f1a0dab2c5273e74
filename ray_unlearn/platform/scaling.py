"""Verification spread over Ray Train workers: samples/s with N workers over N x samples/s with one
(scaling efficiency), through the platform's own sharded integrity sampling
(`platform.train.sharded_integrity_samples`: worker r samples every N-th seed, rank 0 gathers).
Each worker count runs as its own TorchTrainer, one after the other, on the same seeds; the
gathered samples must equal the single worker's (the sharding never changes an image).
On CPU every worker gets one thread (OMP_NUM_THREADS=1), so N workers use N cores; with GPUs
(`use_gpu`) each worker gets one device.
"""

from __future__ import annotations

import tempfile
import time
from types import SimpleNamespace

import torch

from ray_unlearn.config import UnlearnConfig


def _worker(config: dict) -> dict:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from ray_unlearn.engine import load_family
    from ray_unlearn.platform.train import sharded_integrity_samples

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = UnlearnConfig.model_validate(config["unlearn"])
    cfg.train.device = str(ray.train.torch.get_device())
    fam = load_family(cfg, lora=False)
    fam.generate(fam.initial_noise([0]))  # warm-up, outside the timing
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    images = sharded_integrity_samples(SimpleNamespace(family=fam, cfg=cfg), rank, world)
    seconds = time.perf_counter() - t0  # rank 0: until every shard is gathered
    ray.train.report({"seconds": seconds}, checkpoint=None)
    # Ray Train returns no tensors from a worker: numpy
    return {"seconds": seconds, "images": images.numpy()} if rank == 0 else None


def run_scaling(cfg: UnlearnConfig | None = None, workers: list[int] = (1, 2), n_samples: int = 16,
                use_gpu: bool | None = None) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = (cfg or UnlearnConfig()).model_copy(deep=True)
    cfg.eval.n_integrity = n_samples
    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(workers) + 1, include_dashboard=False,
                 _temp_dir=tempfile.mkdtemp(prefix="ru-", dir="/tmp"),
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
    try:
        runs = {}
        storage = tempfile.mkdtemp(prefix="ru-scaling-")
        for n in workers:
            trainer = TorchTrainer(
                _worker, train_loop_config={"unlearn": cfg.model_dump(mode="json")},
                scaling_config=ScalingConfig(num_workers=n, use_gpu=use_gpu, resources_per_worker={"CPU": 0.99}),
                run_config=RunConfig(name=f"scaling-{n}", storage_path=storage),
            )
            runs[n] = trainer.fit().return_value
    finally:
        if started:
            ray.shutdown()
    one = runs[min(workers)]
    rate1 = n_samples / one["seconds"] * (1 / min(workers))
    res = {"device": "gpu" if use_gpu else "cpu (1 thread per worker)", "samples": n_samples,
           "sampler": f"{cfg.sampler.kind} {cfg.sampler.steps}", "model": cfg.model.path}
    for n, r in runs.items():
        rate = n_samples / r["seconds"]
        res[f"workers_{n}"] = {"seconds": round(r["seconds"], 4), "samples_per_s": round(rate, 3),
                               "scaling_efficiency": round(rate / (n * rate1), 3),
                               "max_abs_diff_vs_fewest": float(abs(r["images"] - one["images"]).max())}
    return res
