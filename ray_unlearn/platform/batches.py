"""The platform side of the deletion-request processor: a batch as a Ray task on a GPU worker, and
the MLflow runs of batches whose processor died (ended KILLED by the next processor)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


def run_on_gpu(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, list[str]]:
    """`fn(*args, **kwargs)` as one Ray task holding one GPU (RAY_ADDRESS, else a local Ray), never
    retried (a retry would be a second holder of the same requests); (its result, the GPU ids Ray
    gave it)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=True)
    task = ray.remote(num_gpus=1, max_retries=0)(_with_gpu_ids)
    return ray.get(task.remote(fn, args, kwargs))


def _with_gpu_ids(fn, args, kwargs) -> tuple[Any, list[str]]:
    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    return fn(*args, **kwargs), [str(g) for g in ray.get_gpu_ids()]


def end_abandoned_runs(tracking_uri: str, experiment: str, holder_gone: Callable[[str, int], bool],
                       status: str = "KILLED") -> list[str]:
    """End the RUNNING runs of `experiment` whose `holder` tag names a processor that is gone
    (`holder_gone(holder, start_time_ms)`), with `status` and a tag saying who ended them;
    returns their run ids."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    ended = []
    for run in client.search_runs([exp.experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  max_results=1000):
        holder = run.data.tags.get("holder")
        if not holder or not holder_gone(holder, run.info.start_time or 0):
            continue
        client.set_tag(run.info.run_id, "ended_because", f"its processor {holder} died; ended by the next processor")
        client.set_terminated(run.info.run_id, status=status)
        ended.append(run.info.run_id)
        logger.info("MLflow run %s of dead processor %s ended %s", run.info.run_id, holder, status)
    return ended
