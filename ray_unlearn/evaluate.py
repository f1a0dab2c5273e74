"""The evaluation protocol (docs/method.md "How the result is judged"), as numbers a report can hold.

Per target: SSCD between the target and what the model now makes of it (from the target's own
initial noise, or, for an image without one, by noising it to eval_strength*T and denoising),
for base and unlearned models. Integrity: base vs unlearned from the same N unrelated initial
noises: SSIM, LPIPS, FID, and specificity: SSCD(base_i, hotfix_i) over the same pairs, i.e. how
far every unrelated output moved, against which the target's own move is ranked. A target counts
as forgotten only when its SSCD is below the threshold, its new output is not artifact texture
(docs/method.md's trap: a low SSCD bought with noise) AND it moved clearly more than unrelated
outputs did (`target_verdict`). The integrity gate refuses a hotfix whose SSIM is below its bound
or whose collateral forgetting (the share of unrelated outputs pushed below the threshold) is
above its bound (`integrity_gate`). For a target with a prompt, an integrity seed (another seed of
that prompt) whose base output is a copy of the target (`target_copies`: SSCD at or above the
threshold, the same test that says a model produces a picture) is not an unrelated output: it is
left out of the rank test and of collateral forgetting, and reported apart (docs/method.md
"Specific forgetting").
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


def unrelated_shift(metrics: Metrics, base: torch.Tensor, new: torch.Tensor,
                    base_emb: torch.Tensor | None = None) -> torch.Tensor:
    """SSCD(base_i, hotfix_i) for the integrity seeds: how far each unrelated output moved (1 =
    unchanged). `base_emb`: the base samples' SSCD embeddings when already computed (a batch
    embeds them once for all its requests)."""
    if len(base) != len(new):
        raise ValueError(f"{len(base)} base and {len(new)} unlearned integrity samples: they must pair up")
    if base_emb is None:
        base_emb = metrics.sscd_embed(base)
    return (base_emb * metrics.sscd_embed(new)).sum(dim=1)


def target_copies(metrics: Metrics, base: torch.Tensor, target_images: torch.Tensor, threshold: float,
                  base_emb: torch.Tensor | None = None) -> torch.Tensor:
    """Which integrity seeds' base outputs are copies of a target: SSCD(base_i, target) at or above
    the forget threshold for some target, the criterion by which a model "produces" a picture
    (a request's gate 0). Such seeds are the target again, not unrelated outputs (a text-to-image
    model draws the same wrong flag for several seeds of its prompt), so their forgetting is the
    request's effect, not collateral (`specificity_figures`). Bool per integrity seed."""
    if len(target_images) == 0:
        return torch.zeros(len(base), dtype=torch.bool)
    if base_emb is None:
        base_emb = metrics.sscd_embed(base)
    sim = base_emb @ metrics.sscd_embed(target_images).T  # [n_integrity, n_targets]
    return (sim.max(dim=1).values >= threshold).cpu()


def specificity_figures(cfg: EvalConfig, shift: torch.Tensor, threshold: float,
                        copies: torch.Tensor | None = None) -> dict:
    """Summary of `unrelated_shift`: median, 10th percentile, minimum, the rule's bound (the
    `cfg.specificity_percentile`-th percentile, numpy's linear interpolation) and collateral
    forgetting: the share of unrelated outputs whose SSCD(base_i, hotfix_i) is below the forget
    threshold, i.e. that the threshold alone would call forgotten.

    `copies` (`target_copies`; None: none known): integrity seeds whose base output is a copy of a
    target are not unrelated outputs; they are left out of every figure here (the rank test's
    bound and collateral forgetting) and reported under `copies`, with how many of them the hotfix
    forgot. When fewer than 2 seeds would remain, nothing is left out (collateral is then counted
    over all seeds, the stricter reading) and `copies` says so."""
    v_all = shift.double().cpu().numpy()
    keep = np.ones(len(v_all), dtype=bool) if copies is None else ~np.asarray(copies.cpu(), dtype=bool)
    if len(v_all) != len(keep):
        raise ValueError(f"{len(v_all)} unrelated pairs but {len(keep)} copy flags: they must pair up")
    note = None
    if (~keep).any() and keep.sum() < 2:
        note = f"{int((~keep).sum())} of {len(v_all)} integrity seeds copy the target: too few left, none left out"
        copied, keep = ~keep, np.ones(len(v_all), dtype=bool)
    else:
        copied = ~keep
    v = v_all[keep]
    if len(v) < 2:
        raise ValueError(f"specificity needs at least 2 unrelated pairs, got {len(v)}")
    below = int((v < threshold).sum())
    return {
        "n": len(v),
        "median": round(float(np.median(v)), 4),
        "p10": round(float(np.percentile(v, 10)), 4),
        "min": round(float(v.min()), 4),
        "percentile": cfg.specificity_percentile,
        "bound": None if cfg.specificity_percentile is None else round(float(np.percentile(v, cfg.specificity_percentile)), 4),
        "threshold": round(float(threshold), 4),
        "collateral": round(below / len(v), 4),
        "collateral_count": below,
        "max_collateral": cfg.max_collateral,
        "values": [round(float(x), 4) for x in v],
        "copies": {
            "n": int(copied.sum()),
            "indices": [int(i) for i in np.flatnonzero(copied)],
            "values": [round(float(x), 4) for x in v_all[copied]],
            "forgotten": int((v_all[copied] < threshold).sum()),
            "left_out": note is None,
            "note": note,
        },
    }


def target_specificity(sscd_base_hotfix: float, spec: dict | None) -> dict:
    """The target's own SSCD(base, hotfix) ranked among the unrelated pairs' (`spec`:
    `specificity_figures`; None = not measured): `rank` is the share of unrelated outputs that
    moved at least as much (0: the target moved more than every one), `margin` the rule's bound
    minus the target's value (> 0: specific; None with `specific` when the rule is off)."""
    x = round(float(sscd_base_hotfix), 4)  # the reported figures decide, so a reader can redo the verdict
    out = {"sscd_base_hotfix": x, "rank": None, "margin": None, "specific": None}
    if spec is not None:
        v = np.asarray(spec["values"])
        out["rank"] = round(float((v <= x).mean()), 4)
        if spec["bound"] is not None:
            out["margin"] = round(spec["bound"] - x, 4)
            out["specific"] = bool(x < spec["bound"])
    return out


def target_verdict(below_threshold: bool, artifact: bool, specific: bool | None = None) -> tuple[bool, str | None]:
    """The one rule for "forgotten" (reports, batches and re-verification all call it):
    (forgotten, why not). A target is forgotten when all three hold:

    1. its SSCD against what the model now makes of it is below the forget threshold;
    2. that new output is not artifact texture;
    3. it is specific: the target's output moved clearly more than unrelated outputs did. Its
       SSCD(base, hotfix) must be below the `eval.specificity_percentile`-th percentile (default
       10) of SSCD(base_i, hotfix_i) over the integrity seeds, the same pairs SSIM uses, from the
       same model: `target_specificity`'s `specific`.

    Why a percentile of the unrelated pairs, not an absolute margin: at small resolutions SSCD
    barely separates "the same face, slightly changed" from "a different face" (two distinct demo
    faces score ~0.44), so only a comparison with how far everything else moved, on the same
    model, at the same size, tells specific forgetting from global damage. It is a rank test: if
    the hotfix changed every output alike, the target is just one more of them and lands below
    the 10th percentile with probability ~0.1; it needs no calibration data beyond the integrity
    samples every evaluation already makes. `specific=None` means "not measured" (no unrelated
    outputs at hand, e.g. re-verifying an earlier request from its stored descriptor): the
    verdict then rests on 1 and 2, and the row says so elsewhere (its `specific` is None)."""
    if not below_threshold:
        return False, "SSCD not below the threshold"
    if artifact:
        return False, "low SSCD, but the output is artifact texture"
    if specific is False:
        return False, "not specific: its output moved no more than unrelated outputs did"
    return True, None


def integrity_gate(cfg: EvalConfig, integrity: dict, spec: dict | None) -> dict:
    """The integrity gate, on `integrity_figures` plus `specificity_figures` (None: SSCD was
    unavailable): mean SSIM at least `cfg.min_integrity_ssim` AND collateral forgetting at most
    `cfg.max_collateral`. Sets min_ssim, collateral, max_collateral, ok, why (None when ok) and
    failed (which rules failed: 'ssim', 'collateral'; `integrity_by_prompt` adds 'prompt_ssim') on
    `integrity` and returns it."""
    why, failed = [], []
    if integrity.get("ssim") is None:
        why.append("SSIM unavailable")
        failed.append("ssim")
    elif integrity["ssim"] < cfg.min_integrity_ssim:
        why.append(f"SSIM {integrity['ssim']} below {cfg.min_integrity_ssim}")
        failed.append("ssim")
    collateral = None if spec is None else spec["collateral"]
    if collateral is None:
        why.append("collateral forgetting not measured (SSCD unavailable)")
        failed.append("collateral")
    elif collateral > cfg.max_collateral:
        why.append(f"collateral forgetting {collateral:.1%} of unrelated outputs above {cfg.max_collateral:.1%}")
        failed.append("collateral")
    integrity.update(min_ssim=cfg.min_integrity_ssim, collateral=collateral, max_collateral=cfg.max_collateral,
                     ok=not why, why="; ".join(why) or None, failed=failed)
    return integrity


def judge_targets(
    metrics: Metrics,
    targets: list[Target],
    base_out: torch.Tensor,
    new_out: torch.Tensor,
    threshold: float,
    reference_hf: float,
    spec: dict | None = None,
) -> list[dict]:
    """One row per target; `spec` (`specificity_figures`) ranks each target's SSCD(base, hotfix)
    among the unrelated outputs' (None: not measured)."""
    images = torch.stack([t.image for t in targets])
    e_img, e_base, e_new = (metrics.sscd_embed(x) for x in (images, base_out, new_out))
    s_base, s_new, s_shift = (e_img * e_base).sum(1), (e_img * e_new).sum(1), (e_base * e_new).sum(1)
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
                **target_specificity(float(s_shift[i]), spec),
            }
        )
        rows[-1]["forgotten"], rows[-1]["why"] = target_verdict(below, artifact, rows[-1]["specific"])
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
    for name, images in (("the targets' base outputs", target_base_out), ("the targets' new outputs", target_new_out),
                         ("the integrity base samples", integrity_base), ("the integrity new samples", integrity_new)):
        if not bool(torch.isfinite(images).all()):
            raise ValueError(f"{name} contain non-finite pixels (NaN/inf): the model diverged; nothing to evaluate "
                             "(lower train.lr and run again)")
    unavailable: dict[str, str] = {}
    threshold = _maybe(lambda: calibrate_threshold(cfg, metrics, reference), unavailable, "sscd")
    reference_hf = float(high_frequency_energy(integrity_base).max())
    rows = spec = None
    if threshold is not None:
        shift = _maybe(lambda: unrelated_shift(metrics, integrity_base, integrity_new), unavailable, "sscd")
        # copies are looked for among a prompt's other seeds only (conditional targets; docs/method.md
        # "Specific forgetting"): unconditional targets' figures count every integrity seed, as before
        prompted = [t for t in targets if t.spec.prompt is not None]
        copies = None if shift is None or not prompted else _maybe(
            lambda: target_copies(metrics, integrity_base, torch.stack([t.image for t in prompted]), threshold["value"]),
            unavailable, "sscd")
        spec = None if shift is None else specificity_figures(cfg, shift, threshold["value"], copies)
        rows = _maybe(
            lambda: judge_targets(metrics, targets, target_base_out, target_new_out, threshold["value"], reference_hf,
                                  spec),
            unavailable,
            "sscd",
        )
    if spec is not None and rows:  # the least specific target, for tables and tags
        spec["target_margin"] = None if spec["bound"] is None else min(r["margin"] for r in rows)
        spec["target_rank"] = max(r["rank"] for r in rows)
    integrity = integrity_figures(metrics, integrity_base, integrity_new, fid=cfg.fid)
    integrity["unavailable"].update(unavailable)
    integrity_gate(cfg, integrity, spec)
    forgotten = rows is not None and all(r["forgotten"] for r in rows)
    return {
        "targets": rows or [],
        "forget_threshold": threshold,
        "artifact_bound": round(ARTIFACT_FACTOR * reference_hf, 4),
        "specificity": spec,
        "integrity": integrity,
        "all_forgotten": forgotten,
        "passed": forgotten and integrity["ok"],
    }


def integrity_by_prompt(cfg: EvalConfig, metrics: Metrics, result: dict, base: torch.Tensor, new: torch.Tensor,
                        groups: list[tuple[str, int]]) -> list[dict]:
    """Each prompt's integrity apart, for an integrity set of several prompts (sd3 with
    model.sd3.extra_prompts; `groups`: (prompt, number of samples) in sample order, the run's own
    prompt first): mean and minimum SSIM, LPIPS, the median SSCD(base_i, hotfix_i), and how many of
    its outputs fell below the forget threshold (copies of a target, `specificity.copies`, counted
    apart). A prompt whose mean SSIM is below `cfg.min_integrity_ssim` fails the integrity gate,
    whatever the pooled mean: one wrecked prompt is not averaged away. Sets
    result["integrity"]["prompts"] and updates the gate and result["passed"]."""
    if sum(n for _, n in groups) != len(base) or len(base) != len(new):
        raise ValueError(f"{len(base)} base and {len(new)} new integrity samples for groups of {sum(n for _, n in groups)}")
    unavailable: dict[str, str] = {}
    ssim = _maybe(lambda: metrics.ssim(base, new), unavailable, "ssim")
    lpips = _maybe(lambda: metrics.lpips(base, new), unavailable, "lpips")
    shift = _maybe(lambda: unrelated_shift(metrics, base, new), unavailable, "sscd")
    threshold = (result.get("forget_threshold") or {}).get("value")
    copies = set(((result.get("specificity") or {}).get("copies") or {}).get("indices", []))
    rows, start = [], 0
    for i, (prompt, n) in enumerate(groups):
        sl = slice(start, start + n)
        idx = [j for j in range(start, start + n) if j not in copies]
        row = {"prompt": prompt, "own": i == 0, "n": n,
               "ssim": None if ssim is None else round(float(ssim[sl].mean()), 4),
               "ssim_min": None if ssim is None else round(float(ssim[sl].min()), 4),
               "lpips": None if lpips is None else round(float(lpips[sl].mean()), 4),
               "sscd_median": None if shift is None else round(float(shift[sl].median()), 4),
               "copies": n - len(idx),
               "below_threshold": None if shift is None or threshold is None else int((shift[idx] < threshold).sum())}
        rows.append(row)
        start += n
    integrity = result["integrity"]
    failing = [r for r in rows if r["ssim"] is not None and r["ssim"] < cfg.min_integrity_ssim]
    if failing:
        why = "; ".join(f"SSIM {r['ssim']} on {r['prompt']!r} below {cfg.min_integrity_ssim}" for r in failing)
        integrity["why"] = "; ".join(w for w in (integrity.get("why"), why) if w)
        integrity["ok"] = False
        integrity["failed"] = [*integrity.get("failed", []), "prompt_ssim"]
    integrity["prompts"] = rows
    integrity["unavailable"].update(unavailable)
    result["passed"] = bool(result["all_forgotten"] and integrity["ok"])
    return rows
