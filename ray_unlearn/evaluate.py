"""The evaluation protocol (docs/method.md "How the result is judged"), as numbers a report can hold.

Per target: SSCD between the target and what the model now makes of it (from the target's own
initial noise, or, for an image without one, by noising it to eval_strength*T and denoising),
for base and unlearned models. Integrity: base vs unlearned from the same N unrelated initial
noises: SSIM, LPIPS, FID. A target counts as forgotten only when its SSCD is below the threshold
AND its new output is not artifact texture (docs/method.md's trap: a low SSCD bought with noise).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ray_unlearn.config import EvalConfig
from ray_unlearn.data import Target
from ray_unlearn.families.base import DiffusionFamily
from ray_unlearn.metrics import Metrics, MetricUnavailable, sscd_similarity_matrix

# SDEdit strength used to ask a model "what do you make of this image" when a target has no seed.
EVAL_STRENGTH = 0.5
# An output whose high-frequency energy exceeds the base samples' maximum by this factor is
# flagged as artifact texture rather than a new image.
ARTIFACT_FACTOR = 1.5


def integrity_seeds(cfg: EvalConfig) -> list[int]:
    return list(range(cfg.integrity_seed_offset, cfg.integrity_seed_offset + cfg.n_integrity))


def model_outputs_for_targets(family: DiffusionFamily, targets: list[Target], desc: str | None = None) -> torch.Tensor:
    """What the model makes of each target: from its noise when known, else SDEdit of the image."""
    out = [None] * len(targets)
    with_noise = [i for i, t in enumerate(targets) if t.noise is not None]
    if with_noise:
        imgs = family.generate(torch.stack([targets[i].noise for i in with_noise]), progress=desc)
        for i, img in zip(with_noise, imgs):
            out[i] = img
    for i, t in enumerate(targets):
        if out[i] is None:
            out[i] = family.sdedit(t.image[None], EVAL_STRENGTH, seed=0)[0]
    return torch.stack(out)


def high_frequency_energy(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute Laplacian per image: noise-like texture scores high, faces low."""
    k = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    grey = images.float().mean(1, keepdim=True)
    return F.conv2d(grey, k, padding=1)[..., 1:-1, 1:-1].abs().flatten(1).mean(1)


def calibrate_threshold(cfg: EvalConfig, metrics: Metrics, reference: torch.Tensor) -> dict:
    """The forget threshold: fixed (paper: 0.4 at 256 px) or a high percentile of SSCD between
    distinct reference images (at 32 px two different faces already score ~0.4)."""
    if cfg.threshold == "fixed" or len(reference) < 2:
        return {"value": cfg.fixed_threshold, "kind": "fixed", "source": "paper V-A (SSCD < 0.4)"}
    emb = metrics.sscd_embed(reference)
    sim = sscd_similarity_matrix(emb, emb)
    off = sim[~torch.eye(len(sim), dtype=torch.bool)].numpy()
    value = float(np.percentile(off, cfg.calibration_percentile))
    return {
        "value": round(value, 4),
        "kind": "calibrated",
        "source": f"p{cfg.calibration_percentile:g} of SSCD between {len(reference)} distinct remember images "
        f"({len(off)} pairs; median {float(np.median(off)):.3f})",
    }


def _maybe(fn, unavailable: dict, name: str):
    try:
        return fn()
    except MetricUnavailable as err:
        unavailable[name] = str(err)
        return None


def integrity_figures(metrics: Metrics, base: torch.Tensor, new: torch.Tensor, fid: bool = True) -> dict:
    unavailable: dict[str, str] = {}
    ssim = _maybe(lambda: metrics.ssim(base, new), unavailable, "ssim")
    lpips = _maybe(lambda: metrics.lpips(base, new), unavailable, "lpips")
    fid = _maybe(lambda: metrics.fid(base, new), unavailable, "fid") if fid else None
    return {
        "n": len(base),
        "ssim": None if ssim is None else round(float(ssim.mean()), 4),
        "lpips": None if lpips is None else round(float(lpips.mean()), 4),
        "fid": None if fid is None else round(float(fid), 3),
        "fid_note": "between base and unlearned outputs; biased upward at small n",
        "unavailable": unavailable,
    }


def target_verdict(below_threshold: bool, artifact: bool) -> tuple[bool, str | None]:
    """The one rule for "forgotten" (reports, batches and re-verification all call it):
    (forgotten, why not) for a target whose SSCD is / is not below the threshold and whose new
    output is / is not artifact texture."""
    if not below_threshold:
        return False, "SSCD not below the threshold"
    if artifact:
        return False, "low SSCD, but the output is artifact texture"
    return True, None


def judge_targets(
    metrics: Metrics,
    targets: list[Target],
    base_out: torch.Tensor,
    new_out: torch.Tensor,
    threshold: float,
    reference_hf: float,
) -> list[dict]:
    images = torch.stack([t.image for t in targets])
    s_base = metrics.sscd(images, base_out)
    s_new = metrics.sscd(images, new_out)
    hf = high_frequency_energy(new_out)
    rows = []
    for i, t in enumerate(targets):
        artifact = bool(hf[i] > ARTIFACT_FACTOR * reference_hf)
        below = bool(s_new[i] < threshold)
        rows.append(
            {
                "id": t.id,
                "content_sha256": t.content_hash,
                "seed": t.spec.seed,
                "sscd_base": round(float(s_base[i]), 4),
                "sscd_unlearned": round(float(s_new[i]), 4),
                "below_threshold": below,
                "artifact": artifact,
                "hf_energy": round(float(hf[i]), 4),
            }
        )
        rows[-1]["forgotten"], rows[-1]["why"] = target_verdict(below, artifact)
    return rows


def evaluate_outputs(
    cfg: EvalConfig,
    metrics: Metrics,
    targets: list[Target],
    target_base_out: torch.Tensor,
    target_new_out: torch.Tensor,
    integrity_base: torch.Tensor,
    integrity_new: torch.Tensor,
    reference: torch.Tensor,
) -> dict:
    """All of a report's judgement, from outputs already generated."""
    unavailable: dict[str, str] = {}
    threshold = _maybe(lambda: calibrate_threshold(cfg, metrics, reference), unavailable, "sscd")
    reference_hf = float(high_frequency_energy(integrity_base).max())
    rows = None
    if threshold is not None:
        rows = _maybe(
            lambda: judge_targets(metrics, targets, target_base_out, target_new_out, threshold["value"], reference_hf),
            unavailable,
            "sscd",
        )
    integrity = integrity_figures(metrics, integrity_base, integrity_new, fid=cfg.fid)
    integrity["unavailable"].update(unavailable)
    integrity["min_ssim"] = cfg.min_integrity_ssim
    integrity["ok"] = integrity["ssim"] is not None and integrity["ssim"] >= cfg.min_integrity_ssim
    forgotten = rows is not None and all(r["forgotten"] for r in rows)
    return {
        "targets": rows or [],
        "forget_threshold": threshold,
        "artifact_bound": round(ARTIFACT_FACTOR * reference_hf, 4),
        "integrity": integrity,
        "all_forgotten": forgotten,
        "passed": forgotten and integrity["ok"],
    }
