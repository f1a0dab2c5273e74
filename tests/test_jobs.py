"""The jobs/ scripts as a cluster runs them: `ray job submit` to a real local Ray head (token
authentication on), the output parsed from the job's log. One head serves the whole module.

Adding a job: a tiny config, `rc, out = submit(ray_head, "jobs/x.py", *args)`, assert on
`last_json(out)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ray_head import last_json, ray_head, submit  # noqa: F401  (ray_head: the module's fixture)

pytestmark = pytest.mark.slow  # a Ray head, a job driver and Train workers: a minute or more


def tiny_config(model_dir: Path, tmp_path: Path, steps: int = 4) -> Path:
    """A YAML config that makes a run take seconds (the settings of test_platform_train's tiny_cfg)."""
    cfg = {
        "model": {"path": str(model_dir)},
        "sampler": {"steps": 4},
        "remember": {"n": 4},
        "eval": {"n_integrity": 4},
        "cache_dir": str(tmp_path / "cache"),
        # exactly `steps`: the job's step and checkpoint accounting is under test (extra rounds: test_rounds.py)
        "train": {"batch_forget": 2, "batch_remember": 2, "steps": steps, "device": "cpu", "extra_rounds": 0},
        "targets": [{"seed": 3}],
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_head_enforces_token_auth(ray_head):
    assert json.loads(ray_head.get("/api/authentication_mode", token=None)[1])["authentication_mode"] == "token"
    assert ray_head.get("/api/jobs/", token=None)[0] == 401
    assert ray_head.get("/api/jobs/", token="not-the-token")[0] == 403
    assert ray_head.get("/api/jobs/")[0] == 200
    assert ray_head.proc.pid in ray_head.marked_pids()  # teardown's safety net can see the head's processes


def test_unlearn_job(ray_head, tiny_model_dir, tmp_path):
    from diffusers import DDPMPipeline

    store = tmp_path / "store"
    rc, out = submit(ray_head, "jobs/unlearn.py", "--config", str(tiny_config(tiny_model_dir, tmp_path)),
                     "--storage", str(store), "--checkpoint-every", "2", "--no-gpu", "--json")
    assert rc == 0, out[-6000:]
    res = last_json(out)
    assert res["step"] == 4 and res["resumed_from_step"] == 0 and res["world_size"] == 1
    assert res["use_gpu"] is False
    assert Path(res["run_path"]) == store / res["name"]  # --storage was honoured
    assert 0 < res["integrity_ssim"] <= 1 and res["sscd"] is not None
    report = json.loads(Path(res["report"]).read_text())
    assert report["steps"] == 4 and report["world_size"] == 1
    assert (Path(res["checkpoint"]) / "report.json").is_file()
    DDPMPipeline.from_pretrained(res["hotfix"])


def test_search_job(ray_head, tiny_model_dir, tmp_path):
    from ray_unlearn.cli import NOTHING_PASSED
    from ray_unlearn.platform.tracking import Registry

    space = tmp_path / "space.yaml"
    space.write_text("method: surrogate\nspace:\n  train.lr: {loguniform: [1.0e-3, 1.0e-2]}\n  train.steps: {int: [2, 3]}\n")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc, out = submit(ray_head, "jobs/search.py", "--config", str(tiny_config(tiny_model_dir, tmp_path)),
                     "--set", "eval.n_integrity=6", "--set", "eval.threshold=fixed", "--set", "eval.fixed_threshold=0.995",
                     "--set", "eval.min_integrity_ssim=0", "--space", str(space), "--trials", "2", "--proxy-integrity", "4",
                     "--max-concurrent", "1", "--storage", str(tmp_path / "store"), "--tracking-uri", tracking,
                     "--promote", "--no-gpu", "--json")
    res = last_json(out)
    assert len(res["trials"]) == 2 and res["base_sampling_passes"] == 1, out[-6000:]
    assert (tmp_path / "store" / "searches" / res["search"] / "pareto.json").is_file()
    reg = Registry(tracking)
    assert len(reg.find(search=res["search"])) == 2
    # --promote serves the chosen point exactly when the registry's promotion gate passes it; else
    # nothing serves, the summary says why and the job fails (exit 3, which `ray job submit` reports as 1)
    gate = reg.get(res["chosen"]["version"]).refusal() if res["chosen"] else NOTHING_PASSED
    if gate is None:
        assert rc == 0, out[-6000:]
        assert res["promoted_version"] == res["chosen"]["version"] == reg.serving().version
    else:
        assert rc != 0 and res.get("promoted_version") is None and reg.serving() is None
        assert res["promotion_refused"] == gate
