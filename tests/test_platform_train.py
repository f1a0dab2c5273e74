"""Ray Train around the engine on a tiny model: one worker, two workers (all-reduce), kill and resume."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from ray_unlearn.config import load_config  # noqa: E402
from ray_unlearn.platform.train import run_train  # noqa: E402

pytestmark = pytest.mark.slow  # each test starts Ray workers and trains: tens of seconds at least


@pytest.fixture(scope="module")
def ray_cluster():
    # our own small local cluster; a short temp dir keeps Ray's socket paths under the length limit
    temp_dir = tempfile.mkdtemp(prefix="ru-", dir="/tmp")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def tiny_cfg(model_dir, tmp_path, steps=4):
    return load_config(overrides=[
        f"model.path={model_dir}", "sampler.steps=4", "remember.n=4", "eval.n_integrity=4",
        f"cache_dir={tmp_path / 'cache'}", "train.batch_forget=2", "train.batch_remember=2",
        f"train.steps={steps}", "train.device=cpu",
        "train.extra_rounds=0",  # exactly `steps`: step counts and checkpoints are under test (rounds: test_rounds.py)
    ], base={"targets": [{"seed": 3}]})


def test_one_worker_run_reports_and_leaves_a_loadable_hotfix(ray_cluster, tiny_model_dir, tmp_path):
    from diffusers import DDPMPipeline

    out = run_train(tiny_cfg(tiny_model_dir, tmp_path), num_workers=1, storage_path=str(tmp_path / "runs"),
                    checkpoint_every=2)
    assert out["step"] == 4 and out["resumed_from_step"] == 0
    for key in ("forgotten", "sscd", "integrity_ssim", "fid", "passed"):
        assert key in out
    assert 0 < out["integrity_ssim"] <= 1
    ckpt = Path(out["checkpoint"])
    report = json.loads((ckpt / "report.json").read_text())
    assert report["steps"] == 4 and report["world_size"] == 1
    assert (ckpt / "loop_state.pt").is_file()
    DDPMPipeline.from_pretrained(out["hotfix"])
    DDPMPipeline.from_pretrained(ckpt / "hotfix")
    # two periodic checkpoints (steps 2; step 4 is the final one) plus the final checkpoint
    assert len([p for p in Path(out["run_path"]).glob("checkpoint_*") if p.is_dir()]) == 2


def test_two_workers_stay_in_sync(ray_cluster, tiny_model_dir, tmp_path):
    out = run_train(tiny_cfg(tiny_model_dir, tmp_path, steps=3), num_workers=2, storage_path=str(tmp_path / "runs"),
                    checkpoint_every=2)
    assert out["world_size"] == 2 and out["step"] == 3
    a, b = out["param_checksums"]
    assert a == pytest.approx(b, rel=1e-9, abs=1e-9)
    # the integrity samples were split across the two workers; one process evaluating the same
    # hotfix must get the same figures (samples do not depend on their batch or worker)
    from ray_unlearn.engine import evaluate_models

    again = evaluate_models(tiny_cfg(tiny_model_dir, tmp_path), str(tiny_model_dir), out["hotfix"], progress=False)
    assert again["integrity"]["ssim"] == out["integrity_ssim"]
    assert [r["sscd_unlearned"] for r in again["targets"]] == [r["sscd_unlearned"] for r in out["report"]["targets"]]


def test_worker_killed_mid_run_resumes_from_checkpoint(ray_cluster, tiny_model_dir, tmp_path):
    marker = tmp_path / "failed-once"
    out = run_train(tiny_cfg(tiny_model_dir, tmp_path), num_workers=1, storage_path=str(tmp_path / "runs"),
                    checkpoint_every=2, max_failures=2,
                    loop_config={"fail_once": {"step": 3, "rank": 0, "marker": str(marker)}})
    # the first attempt died at step 3, after the controller had registered the step-2 checkpoint
    # (the drill waits for that: platform.train._maybe_fail), so the restart resumes from step 2
    assert json.loads(marker.read_text()) == {"failed_at_step": 3, "registered_checkpoint_steps": [2]}
    assert out["resumed_from_step"] == 2 and out["step"] == 4, out
    assert json.loads((Path(out["checkpoint"]) / "report.json").read_text())["resumed_from_step"] == 2
