"""Surrogates x_s = edit(x_f): an image close to the target that lacks what must be forgotten.

Picked by name from SURROGATES; every function maps target images [N,C,H,W] in [0,1] (prepared
for the model) to surrogates of the same shape, deterministically.

`adaptive_sdedit` (surrogate.adapt, the default for 'sdedit') makes sure each surrogate is itself
forgotten: at a fixed strength SDEdit may return the same identity, and a model trained toward it
keeps the target. Per target it climbs a strength ladder, trying several SDEdit noises at each,
until one surrogate's SSCD to its target is below the forget threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from ray_unlearn.config import SurrogateConfig
from ray_unlearn.data import load_image
from ray_unlearn.families.base import DiffusionFamily

log = logging.getLogger(__name__)


def sdedit(family: DiffusionFamily, x_f: torch.Tensor, cfg: SurrogateConfig) -> torch.Tensor:
    # Paper: stronger edits forget more and cost integrity (Table II); strength is a searched knob.
    return family.sdedit(x_f, cfg.strength, cfg.seed)


def flip(family: DiffusionFamily, x_f: torch.Tensor, cfg: SurrogateConfig) -> torch.Tensor:
    return x_f.flip(-1)


def noise(family: DiffusionFamily, x_f: torch.Tensor, cfg: SurrogateConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed)
    return (x_f + cfg.sigma * torch.randn(x_f.shape, generator=g).to(x_f.device)).clamp(0, 1)


def provided(family: DiffusionFamily, x_f: torch.Tensor, cfg: SurrogateConfig) -> torch.Tensor:
    if len(cfg.paths) != len(x_f):
        raise ValueError(
            f"surrogate.kind='provided' needs one edited image per target: got {len(cfg.paths)} "
            f"path(s) in surrogate.paths for {len(x_f)} target(s)"
        )
    return torch.cat([family.prepare_images(load_image(p)[None]).to(x_f.device) for p in cfg.paths])


SURROGATES: dict[str, Callable[[DiffusionFamily, torch.Tensor, SurrogateConfig], torch.Tensor]] = {
    "sdedit": sdedit,
    "flip": flip,
    "noise": noise,
    "provided": provided,
}


def make_surrogates(family: DiffusionFamily, x_f: torch.Tensor, cfg: SurrogateConfig) -> torch.Tensor:
    return SURROGATES[cfg.kind](family, x_f, cfg).float().cpu()


def strength_ladder(cfg: SurrogateConfig) -> list[float]:
    """The strengths `adaptive_sdedit` tries, in order: `strength`, then up by `strength_step` to
    `max_strength` (just `strength` when it is already above it)."""
    out, k = [cfg.strength], 1
    while cfg.strength + k * cfg.strength_step <= cfg.max_strength + 1e-9:
        out.append(round(cfg.strength + k * cfg.strength_step, 6))
        k += 1
    return out


def adaptive_sdedit(family: DiffusionFamily, x_f: torch.Tensor, cfg: SurrogateConfig,
                    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    threshold: float) -> tuple[torch.Tensor, list[dict]]:
    """Per target: the first surrogate up the strength ladder, among `cfg.tries` SDEdit noises per
    strength (one batch; noise j of seed `cfg.seed`, so try 0 is what plain 'sdedit' makes of a single
    target), whose similarity to the target is below `threshold - cfg.margin`; the least similar one
    tried when none is. `similarity(a, b)` -> [N] (SSCD). Returns (surrogates [N,C,H,W] in [0,1] on
    CPU, one record per target: strength, try, sscd, bound, below, strengths tried)."""
    bound = threshold - cfg.margin
    images, info = [], []
    for i, x in enumerate(x_f):
        best: tuple[float, float, int, torch.Tensor] | None = None
        tried = 0
        for strength in strength_ladder(cfg):
            cand = family.sdedit(x[None].repeat(cfg.tries, *([1] * x.dim())), strength, cfg.seed).float().cpu()
            sim = similarity(x[None].float().cpu().expand_as(cand), cand)
            j = int(sim.argmin())
            tried += 1
            if best is None or float(sim[j]) < best[0]:
                best = (float(sim[j]), strength, j, cand[j])
            if best[0] < bound:
                break
        sscd, strength, j, img = best
        images.append(img)
        info.append({"strength": strength, "try": j, "sscd": round(sscd, 4), "bound": round(bound, 4),
                     "below": sscd < bound, "strengths_tried": tried})
        if sscd >= bound:
            log.warning("target %d: no SDEdit surrogate up to strength %.2f is below the forget threshold (best SSCD "
                        "%.3f >= %.3f); training toward the least similar one (raise surrogate.max_strength or "
                        "surrogate.tries, or give an edited image: surrogate.kind=provided)", i, strength, sscd, bound)
    return torch.stack(images), info
