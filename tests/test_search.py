"""Ray Tune's Pareto search on a tiny model: local storage and a real S3 API server on loopback."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from conftest import BUCKET  # noqa: E402

from ray_unlearn.config import load_config  # noqa: E402

pytestmark = pytest.mark.slow  # Ray Tune + Ray Train trials: minutes

SPACE = """
method: surrogate
space:
  train.lr: {loguniform: [1.0e-3, 1.0e-2]}
  train.steps: {int: [2, 4]}
  surrogate.strength: {uniform: [0.5, 0.9]}
"""


@pytest.fixture(scope="module")
def ray_with_s3(moto_s3):
    """Our own local Ray, started after the S3 server so its workers get the endpoint and keys."""
    from ray_unlearn.platform.cluster import init_ray

    temp_dir = tempfile.mkdtemp(prefix="ru-", dir="/tmp")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["OMP_NUM_THREADS"] = "1"
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir,
             runtime_env={"env_vars": {k: os.environ[k] for k in (
                 "HF_HUB_OFFLINE", "OMP_NUM_THREADS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_DEFAULT_REGION", "RAY_UNLEARN_S3_ENDPOINT_URL", "AWS_SHARED_CREDENTIALS_FILE")}})
    init_ray()  # a no-op now: the platform's own init must not start a second Ray
    yield moto_s3
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def tiny_cfg(model_dir, tmp_path):
    # fixed, loose gates: the search machinery is under test here, not the tiny model's forgetting
    return load_config(overrides=[
        f"model.path={model_dir}", "sampler.steps=4", "remember.n=4", "eval.n_integrity=6",
        f"cache_dir={tmp_path / 'cache'}", "train.batch_forget=2", "train.batch_remember=2", "train.device=cpu",
        "eval.threshold=fixed", "eval.fixed_threshold=0.995", "eval.min_integrity_ssim=0.0",
        # the loss and surrogate the tiny front was built with (the paper's: 1 - lambda_t, beta 2, a fixed
        # SDEdit strength, exactly `steps`); with the remember term at full weight a random tiny UNet's
        # target moves no more than its other outputs, and no trial is specific
        "method.remember_weighting=complement", "method.beta=2.0", "surrogate.adapt=false", "train.extra_rounds=0",
    ], base={"targets": [{"seed": 3}]})


def options(tmp_path, storage, trials, **kw):
    from ray_unlearn.platform.search import SearchOptions

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    return SearchOptions(space=str(space), trials=trials, proxy_integrity=4, storage=storage,
                         tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", max_concurrent=2,
                         out_dir=str(tmp_path / "out"), **kw)


def test_search_front_mlflow_registry_and_resume(ray_with_s3, tiny_model_dir, tmp_path):
    from mlflow.tracking import MlflowClient

    from ray_unlearn.platform.search import run_search
    from ray_unlearn.platform.tracking import Registry

    opts = options(tmp_path, str(tmp_path / "store"), trials=3)
    summary = run_search(tiny_cfg(tiny_model_dir, tmp_path), opts, progress=False)
    assert len(summary["trials"]) == 3 and not summary["errors"]
    assert summary["base_sampling_passes"] == 1  # remember + integrity + target: one pass for the whole search
    on_disk = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert on_disk["front"] == summary["front"] and (tmp_path / "out" / "pareto.png").stat().st_size > 1000
    assert (tmp_path / "store" / "searches" / summary["search"] / "pareto.json").is_file()
    # the front is the non-dominated forgotten points, re-scored at full size
    assert summary["front"], summary["trials"]
    for p in summary["front"]:
        assert p["scored_on"] == "full n=6" and "proxy" in p
    for p in summary["trials"]:
        assert p["scored_on"] == "proxy n=4"

    client = MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["mlflow_parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3
    for child in children:
        hist = client.get_metric_history(child.info.run_id, "forget/loss")
        assert len(hist) == int(child.data.params["train.steps"]) and [m.step for m in hist] == sorted(m.step for m in hist)
        files = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert "integrity_grid.png" in files and "before_after.png" not in files
        assert child.data.tags["storage_uri"].startswith(str(tmp_path / "store"))
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"pareto.json", "pareto.png"}

    versions = Registry(summary["tracking_uri"]).find(search=summary["search"])
    assert len(versions) == 3
    for p in summary["front"]:
        v = Registry(summary["tracking_uri"]).get(p["version"])
        assert v.tags["scored_on"] == "full n=6" and Path(v.source, "unet").is_dir()

    again = run_search(tiny_cfg(tiny_model_dir, tmp_path), opts, progress=False)  # restores, runs nothing new
    assert again["search"] == summary["search"] and again["base_sampling_passes"] == 0
    assert sorted(p["version"] for p in again["trials"]) == sorted(p["version"] for p in summary["trials"])
    assert len(Registry(summary["tracking_uri"]).find(search=summary["search"])) == 3


def test_search_on_s3_leaves_everything_in_the_bucket(ray_with_s3, tiny_model_dir, tmp_path):
    import boto3
    from mlflow.tracking import MlflowClient

    from ray_unlearn.platform.search import run_search
    from ray_unlearn.platform.tracking import Registry

    prefix = f"s3-search-{os.getpid()}"
    summary = run_search(tiny_cfg(tiny_model_dir, tmp_path), options(tmp_path, f"s3://{BUCKET}/{prefix}", trials=2),
                         progress=False)
    assert len(summary["trials"]) == 2 and not summary["errors"]
    s3 = boto3.client("s3", endpoint_url=ray_with_s3)
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]
    assert f"{prefix}/searches/{summary['search']}/pareto.json" in keys
    assert f"{prefix}/searches/{summary['search']}/reference.pt" in keys
    assert any("/checkpoint_" in k and k.endswith("loop_state.pt") for k in keys)  # checkpoints
    assert any(k.endswith("hotfix/unet/diffusion_pytorch_model.safetensors") for k in keys)  # hotfixes
    assert any(k.endswith("/report.json") for k in keys)  # reports
    client = MlflowClient(summary["tracking_uri"])
    for p in summary["trials"]:
        run = client.get_run(p["mlflow_run_id"])
        assert run.data.tags["storage_uri"].startswith(f"s3://{BUCKET}/{prefix}/")
        v = Registry(summary["tracking_uri"]).get(p["version"])
        assert v.source.startswith(f"s3://{BUCKET}/{prefix}/") and v.source.endswith("/hotfix")
        key = v.source[len(f"s3://{BUCKET}/"):] + "/unet/config.json"
        assert key in keys  # the registered version points at a hotfix that is really in the bucket
