"""Surrogates x_s = edit(x_f): an image close to the target that lacks what must be forgotten.

Picked by name from SURROGATES; every function maps target images [N,C,H,W] in [0,1] (prepared
for the model) to surrogates of the same shape, deterministically.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ray_unlearn.config import SurrogateConfig
from ray_unlearn.data import load_image
from ray_unlearn.families.base import DiffusionFamily


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
