"""The sd3 family through the real CLI: a tiny SD3 (fast), the real SD3-medium architecture with
fewer layers and random weights (slow), and the shipped flag model (slow acceptance run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ray_unlearn.families.sd3 import DEMO_SD3_DIR, LORA_FILE

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "the flag of ireland"


def cli(*args, timeout=1800):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ray_unlearn.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory):
    from ray_unlearn.families.sd3_build import tiny_sd3_pipeline

    d = tmp_path_factory.mktemp("sd3") / "tiny-sd3"
    tiny_sd3_pipeline(("the", "flag", "of", "ireland"), seed=0, image_size=32, num_layers=2, heads=2,
                      vae_blocks=2, max_length=8).save_pretrained(d)
    return d


def small_run(model_dir, tmp_path, **over) -> dict:
    cfg = {
        "model": {"family": "sd3", "path": str(model_dir), "sd3": {"max_sequence_length": 4, "guidance_scale": 3.0}},
        "sampler": {"steps": 2, "batch_size": 4},
        "targets": [{"seed": 3, "prompt": PROMPT}],
        "surrogate": {"kind": "sdedit", "strength": 0.6},
        "remember": {"n": 4},
        "eval": {"n_integrity": 4, "fid": False},
        "train": {"steps": 2, "batch_forget": 1, "batch_remember": 2},
        "cache_dir": str(tmp_path / "cache"),
    }
    for key, value in over.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


@pytest.mark.slow  # ~1-4 min on 2 shared cores (metric models load in the subprocess)
def test_unlearn_tiny_sd3_through_cli(tiny_sd3_dir, tmp_path):
    conf = write_config(tmp_path / "sd3.yaml", small_run(tiny_sd3_dir, tmp_path))
    out = tmp_path / "run"
    res = cli("unlearn", "--config", conf, "--out", out, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["base_model"]["family"] == "sd3" and report["base_model"]["prompt"] == PROMPT
    assert report["config"]["targets"][0]["prompt"] == PROMPT
    assert 0 < report["base_model"]["trainable"] < report["base_model"]["params"]  # LoRA by default
    (row,) = report["targets"]
    assert abs(row["sscd_base"] - 1.0) < 1e-3  # the target IS the base output for (prompt, seed)
    assert (out / "hotfix" / LORA_FILE).is_file()
    assert report["integrity"]["n"] == 4 and 0 < report["integrity"]["ssim"] <= 1


def test_two_prompts_in_one_run_is_a_clear_error(tiny_sd3_dir, tmp_path):
    cfg = small_run(tiny_sd3_dir, tmp_path)
    cfg["targets"] = [{"seed": 3, "prompt": PROMPT}, {"seed": 4, "prompt": "the flag of france"}]
    res = cli("unlearn", "--config", write_config(tmp_path / "two.yaml", cfg), "--out", tmp_path / "run")
    assert res.returncode != 0 and "one run per prompt" in res.stderr


@pytest.mark.slow
def test_real_sd3_medium_architecture_one_step_through_cli(tmp_path):
    """SD3-medium's transformer config (fewer layers, random weights), its 16-channel VAE config, CLIP
    encoders of the real widths (768 + 1280 = 2048 pooled, padded to 4096): one training step and one
    sampling step through the CLI on CPU, at 64 px."""
    from ray_unlearn.families.sd3_build import real_sd3_pipeline

    d = tmp_path / "sd3-medium-1layer"
    real_sd3_pipeline(num_layers=1).save_pretrained(d)
    cfg = small_run(d, tmp_path, sampler={"steps": 1, "batch_size": 2}, remember={"n": 2},
                    eval={"n_integrity": 2, "fid": False, "threshold": "fixed"}, train={"steps": 1, "batch_remember": 1})
    cfg["model"]["sd3"] = {"max_sequence_length": 4, "resolution": 64}
    cfg["surrogate"] = {"kind": "flip"}
    res = cli("unlearn", "--config", write_config(tmp_path / "real.yaml", cfg), "--out", tmp_path / "run", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["steps"] == 1 and report["base_model"]["family"] == "sd3"
    assert (tmp_path / "run" / "hotfix" / LORA_FILE).is_file()


def demo_config(tmp_path: Path, **over) -> Path:
    from ray_unlearn.families.sd3_demo import demo_run_values

    data: dict = {}
    values = {**demo_run_values(tmp_path / "demo"), "cache_dir": str(tmp_path / "cache"), **over}
    if over.get("method.name", "surrogate") != "surrogate":  # the surrogate method's knobs are not another's
        values = {k: v for k, v in values.items() if not k.startswith("method.") or k == "method.name"}
    for key, value in values.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return write_config(tmp_path / f"demo-{len(over)}.yaml", data)


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_SD3_DIR / "sweep.json").is_file(), reason="the flag model is not trained")
def test_flag_demo_wrong_flag_forgotten_other_seeds_intact_neggrad_worse(tmp_path):
    """The acceptance run on the shipped flag model: the card's wrong flag is forgotten, the same
    prompt's other seeds keep integrity SSIM >= 0.8, and NegGrad with the same budget does worse."""
    ours = cli("unlearn", "--config", demo_config(tmp_path), "--out", tmp_path / "ours", "--json")
    assert ours.returncode == 0, ours.stderr[-3000:]
    r = json.loads(ours.stdout)
    (row,) = r["targets"]
    print("surrogate:", json.dumps({"target": row, "threshold": r["forget_threshold"], "integrity": r["integrity"]}))
    assert r["base_model"]["prompt"] == r["config"]["targets"][0]["prompt"]
    assert row["sscd_unlearned"] < r["forget_threshold"]["value"] < row["sscd_base"]
    assert r["integrity"]["ssim"] >= 0.8
    neg = cli("unlearn", "--config", demo_config(tmp_path, **{"method.name": "neggrad"}), "--out", tmp_path / "neg", "--json")
    assert neg.returncode == 0, neg.stderr[-3000:]
    n = json.loads(neg.stdout)
    print("neggrad:", json.dumps({"target": n["targets"][0], "integrity": n["integrity"]}))
    assert n["config"]["train"]["steps"] == r["config"]["train"]["steps"] and n["config"]["train"]["lr"] == r["config"]["train"]["lr"]
    assert n["integrity"]["ssim"] < r["integrity"]["ssim"]


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_SD3_DIR / "sweep.json").is_file(), reason="the flag model is not trained")
def test_demo_family_sd3_runs_the_main_job_on_the_flag_model(tmp_path):
    res = cli("demo", "--family", "sd3", "--trials", "2", "--out", tmp_path / "demo", "--json",
              "--set", "remember.n=8", "--set", "eval.n_integrity=8", "--set", "train.steps=20")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])  # the summary is the last line (Ray may print before it)
    assert len(summary["trials"]) == 2 and summary["request"]
    assert (tmp_path / "demo" / "request.png").is_file() and (tmp_path / "demo" / "sd3").is_dir()


@pytest.mark.slow  # a local Ray, two Tune trials of Ray Train on a tiny SD3: ~2-4 min on 2 shared cores
def test_search_on_sd3_through_cli_with_other_prompts(tmp_path):
    """`ray-unlearn search --space sd3` on a tiny SD3 (the shipped space's keys apply to the family):
    every trial trains a LoRA, scores integrity on the prompt's proxy seeds plus the other prompt's,
    and the front is re-checked on the full set."""
    from ray_unlearn.families.sd3_build import tiny_sd3_pipeline

    model = tmp_path / "tiny-sd3"
    tiny_sd3_pipeline(("the", "flag", "of", "ireland", "italy"), seed=0, image_size=32, num_layers=2, heads=2,
                      vae_blocks=2, max_length=8).save_pretrained(model)
    cfg = small_run(model, tmp_path, model={"family": "sd3", "path": str(model), "sd3": {
        "max_sequence_length": 4, "guidance_scale": 3.0, "extra_prompts": ["the flag of italy"],
        "seeds_per_extra_prompt": 2}},
        # loose, fixed gates: the search machinery is under test, not the tiny model's forgetting
        # (the search starts from the config's lr, clipped to the space: 3e-3, its top)
        surrogate={"kind": "noise", "sigma": 1.0}, train={"batch_forget": 2, "lr": 3e-3},
        eval={"threshold": "fixed", "fixed_threshold": 0.9999})
    conf = write_config(tmp_path / "sd3.yaml", cfg)
    res = cli("search", "--config", conf, "--space", "sd3", "--trials", 2, "--max-concurrent", 1,
              "--proxy-integrity", 2, "--storage", tmp_path / "store", "--tracking-uri",
              f"sqlite:///{tmp_path / 'mlflow.db'}", "--out", tmp_path / "out", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])  # the summary is the last line
    assert not summary["errors"] and len(summary["trials"]) == 2
    for trial in summary["trials"]:
        assert set(trial["params"]) == {"train.lr", "train.steps", "method.beta", "surrogate.strength"}
        assert (Path(trial["hotfix"]) / LORA_FILE).is_file()  # each trial's hotfix is a LoRA
        assert trial["scored_on"] == "proxy n=4"  # 2 proxy seeds of the prompt + 2 of the other prompt
    assert summary["front"] and all(p["scored_on"] == "full n=6" for p in summary["front"])
    assert (tmp_path / "out" / "pareto.json").is_file()
