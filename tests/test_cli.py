"""The real CLI as a subprocess: a tiny model end to end (fast), and the shipped demo model (slow)."""

import json
import os
import sys
from pathlib import Path

import procs
import pytest

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, timeout=900, cwd=None, threads=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads is not None:  # the docs' figures were measured at one thread: sums in another order differ
        env["OMP_NUM_THREADS"] = str(threads)
    return procs.run([sys.executable, "-m", "ray_unlearn.cli", *map(str, args)], timeout=timeout, env=env, cwd=cwd)


def lpips_resolvable() -> bool:
    from ray_unlearn.config import load_config
    from ray_unlearn.metrics import MetricUnavailable
    from ray_unlearn.metrics.resolve import resolve_lpips

    try:
        resolve_lpips(load_config(None, []).eval.metrics)
        return True
    except MetricUnavailable:
        return False


def tiny_args(model_dir, tmp_path):
    return ["--set", f"model.path={model_dir}", "--set", "sampler.steps=4", "--set", "remember.n=4",
            "--set", "eval.n_integrity=4", "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "train.batch_forget=2",
            "--set", "train.batch_remember=2"]


def test_unlearn_tiny_model_writes_report_hotfix_picture(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    res = cli("unlearn", *tiny_args(tiny_model_dir, tmp_path), "--target-seed", "3", "--steps", "2", "--out", out, "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["targets"] == report["targets"]
    for key in ("method", "config", "base_model", "hotfix", "targets", "forget_threshold", "integrity", "wall_seconds"):
        assert key in report
    (row,) = report["targets"]
    assert row["id"] == "seed-3" and abs(row["sscd_base"] - 1.0) < 1e-3  # the target IS the base output
    assert report["forget_threshold"]["kind"] == "calibrated" and 0 < report["forget_threshold"]["value"] < 1
    assert report["integrity"]["n"] == 4 and 0 < report["integrity"]["ssim"] <= 1
    # LPIPS is measured exactly when its backbone resolves offline here; else the report says why not
    measured = lpips_resolvable()
    assert (report["integrity"]["lpips"] is not None) is measured
    assert ("lpips" in report["integrity"]["unavailable"]) is not measured
    assert (out / "hotfix" / "model_index.json").is_file() and (out / "before_after.png").stat().st_size > 1000
    # a second run reuses the cached base outputs
    res2 = cli("unlearn", *tiny_args(tiny_model_dir, tmp_path), "--target-seed", "3", "--steps", "1", "--out", tmp_path / "r2", "--json")
    assert res2.returncode == 0 and json.loads(res2.stdout)["cache"]["integrity_base"] is True
    # evaluate: the same figures for any two models
    res3 = cli("evaluate", out / "hotfix", "--base", tiny_model_dir, *tiny_args(tiny_model_dir, tmp_path), "--target-seed", "3", "--json")
    assert res3.returncode == 0, res3.stderr[-3000:]
    ev = json.loads(res3.stdout)
    assert abs(ev["targets"][0]["sscd_unlearned"] - row["sscd_unlearned"]) < 1e-3


def test_image_target_and_bad_inputs(tiny_model_dir, tmp_path):
    from PIL import Image

    img = tmp_path / "face.png"
    Image.new("RGB", (40, 40), (120, 60, 30)).save(img)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    res = cli("unlearn", *tiny_args(tiny_model_dir, tmp_path), "--target", bad, "--steps", "1", "--out", tmp_path / "x")
    assert res.returncode == 2 and "broken.png is not a readable image" in res.stderr
    res = cli("unlearn", "--set", "train.lrr=1", "--target-seed", "1")
    assert res.returncode == 2 and "train.lrr" in res.stderr and "Traceback" not in res.stderr
    res = cli("unlearn", "--steps", "1")
    assert res.returncode == 2 and "no targets" in res.stderr
    res = cli("unlearn", *tiny_args(tiny_model_dir, tmp_path), "--target", img, "--steps", "1",
              "--set", "surrogate.kind=flip", "--method", "neggrad", "--out", tmp_path / "y", "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout)["targets"][0]["id"] == "face"


@pytest.mark.slow
def test_demo_end_to_end_surrogate_forgets_neggrad_damages(tmp_path):
    """The acceptance run on the shipped demo model through the real CLI."""
    cache = ["--set", f"cache_dir={tmp_path / 'cache'}"]
    # seed 7 at the defaults ends 0.002 under the threshold (docs/benchmarks.md): run as measured
    ours = cli("unlearn", "--target-seed", "7", "--out", tmp_path / "ours", "--json", *cache, threads=1)
    assert ours.returncode == 0, ours.stderr[-3000:]
    r = json.loads(ours.stdout)
    (row,) = r["targets"]
    # The target moved below the threshold. Whether the hotfix PASSES is for the specificity rule and the
    # collateral gate to say (at 32 px the demo model's unrelated outputs move too: docs/benchmarks.md);
    # the verdict must follow the one rule, from the figures the report holds.
    assert row["sscd_unlearned"] < r["forget_threshold"]["value"] < row["sscd_base"] and not row["artifact"]
    spec = r["specificity"]
    assert row["specific"] == (row["sscd_base_hotfix"] < spec["bound"])
    assert row["forgotten"] == bool(row["specific"])
    assert r["integrity"]["ok"] == (r["integrity"]["ssim"] >= r["integrity"]["min_ssim"]
                                    and spec["collateral"] <= r["integrity"]["max_collateral"])
    assert r["passed"] == (row["forgotten"] and r["integrity"]["ok"])
    neg = cli("unlearn", "--target-seed", "7", "--method", "neggrad", "--out", tmp_path / "neg", "--json", *cache,
              "--set", f"train.steps={r['config']['train']['steps']}", "--set", f"train.lr={r['config']['train']['lr']}",
              threads=1)
    assert neg.returncode == 0, neg.stderr[-3000:]
    n = json.loads(neg.stdout)
    assert n["integrity"]["ssim"] < r["integrity"]["ssim"]
    assert n["integrity"]["fid"] > r["integrity"]["fid"]
    assert n["specificity"]["collateral"] > spec["collateral"]  # NegGrad "forgets" more unrelated outputs
    code = (
        "import torch; from diffusers import DDPMPipeline\n"
        f"p = DDPMPipeline.from_pretrained({str(tmp_path / 'ours' / 'hotfix')!r})\n"
        "img = p(batch_size=2, num_inference_steps=10, generator=torch.manual_seed(0), output_type='np').images\n"
        "assert img.shape == (2, 32, 32, 3) and img.std() > 0.05, img.shape\nprint('generated', img.shape)\n"
    )
    res = procs.run([sys.executable, "-c", code], timeout=300)
    assert res.returncode == 0 and "generated" in res.stdout, res.stderr[-2000:]


def test_sample_renders_a_model_or_the_serving_version_seed_by_seed(tiny_model_dir, tmp_path):
    import numpy as np
    from PIL import Image

    from ray_unlearn.config import load_config
    from ray_unlearn.engine import load_family
    from ray_unlearn.platform.registry import Registry

    args = ["--set", "sampler.steps=4", "--set", f"cache_dir={tmp_path / 'cache'}"]
    res = cli("sample", "3", "5", "--model-path", tiny_model_dir, "--out", tmp_path / "direct", *args)
    assert res.returncode == 0, res.stderr[-3000:]
    fam = load_family(load_config(None, ["sampler.steps=4", f"model.path={tiny_model_dir}"]), lora=False)
    want = fam.generate(fam.initial_noise([3, 5]))  # the same output every command names by that seed
    for seed, img in zip((3, 5), want):
        got = np.asarray(Image.open(tmp_path / "direct" / f"seed-{seed}.png"), dtype=np.float32) / 255
        assert np.abs(got - img[0].numpy()).max() <= 1 / 255 + 1e-6
    assert (tmp_path / "direct" / "grid.png").stat().st_size > 100

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    reg = Registry(uri)
    reg.promote(reg.register(str(tiny_model_dir), run_id=None, tags={}).version, force=True)
    served = cli("sample", "3", "--version", "@production", "--tracking-uri", uri, "--out", tmp_path / "served", *args)
    assert served.returncode == 0, served.stderr[-3000:]
    assert (tmp_path / "served" / "seed-3.png").read_bytes() == (tmp_path / "direct" / "seed-3.png").read_bytes()
    missing = cli("sample", "3", "--version", "@staging", "--tracking-uri", uri, "--out", tmp_path / "none", *args)
    assert missing.returncode == 2 and "no version" in missing.stderr and "@staging" in missing.stderr
