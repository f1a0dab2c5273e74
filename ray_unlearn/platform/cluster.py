"""Joining Ray: the one place a driver starts or joins a cluster, and what it forwards to workers.

`ray job submit` sets RAY_ADDRESS and the job's runtime env (which already reaches every worker;
ray.init refuses to redefine one of its env vars), so only what that env lacks is forwarded. Run
outside a job, a local Ray is started and gets the whole list.
"""

from __future__ import annotations

import json
import logging
import os

import ray

from ray_unlearn.storage import ENDPOINT_ENV

logger = logging.getLogger(__name__)

# what a worker needs to reach the model cache, MLflow and the object store as the driver does
FORWARDED_ENV = ("HF_HUB_OFFLINE", "MLFLOW_TRACKING_URI", *ENDPOINT_ENV, "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "OMP_NUM_THREADS")


def worker_env() -> dict[str, str]:
    """The forwarded variables set here that the job's own runtime env does not set."""
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    given = set((job.get("runtime_env") or {}).get("env_vars") or {})
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and k not in given}


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster of a `ray job submit` job (RAY_ADDRESS), or start a local one with
    `num_cpus`; a no-op when Ray is already up in this process."""
    if ray.is_initialized():
        return
    env = worker_env()
    kwargs: dict = {"runtime_env": {"env_vars": env}} if env else {}
    if "RAY_ADDRESS" not in os.environ and num_cpus:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    logger.info("Ray %s: %s", "joined" if "RAY_ADDRESS" in os.environ else "started locally",
                {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")})


def has_gpus() -> bool:
    """Whether the cluster Ray is connected to has any GPU."""
    return ray.cluster_resources().get("GPU", 0) > 0


def shutdown_ray() -> None:
    ray.shutdown()
