"""Input checks and resizing shared by the metrics.

All metrics take float NCHW images in [0, 1]. We check the range instead of silently clamping:
the commonest bug is passing diffusion outputs still in [-1, 1], which would quietly skew every
number.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

_RANGE_TOL = 1e-3


def as_rgb01(images: torch.Tensor, name: str = "images") -> torch.Tensor:
    """Validate and return float32 NCHW RGB in [0, 1] (grey is repeated to three channels)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be NCHW with C in {{1, 3}}, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be float in [0, 1], got {images.dtype}")
    x = images.detach().float()
    if x.numel():
        lo, hi = float(x.min()), float(x.max())
        if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise ValueError(f"{name} must lie in [0, 1], got [{lo:.3f}, {hi:.3f}] (map [-1, 1] outputs with (x+1)/2)")
    x = x.clamp(0, 1)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def check_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = as_rgb01(a, "a"), as_rgb01(b, "b")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"pairwise metric needs equal counts, got {a.shape[0]} and {b.shape[0]}")
    return a, b


def resize_to(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    # antialias matters when shrinking large generations; it is a no-op for upsampling.
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


def small_edge_size(h: int, w: int, edge: int) -> tuple[int, int]:
    """SSCD's evaluation transform: resize so the short side is ``edge``, keeping aspect ratio."""
    s = edge / min(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def batches(n: int, batch_size: int, desc: str) -> Iterator[slice]:
    """Slices over ``n`` items; shows a tqdm bar only when there are many batches."""
    starts = range(0, n, batch_size)
    if len(starts) >= 8:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=desc, leave=False)
    for s in starts:
        yield slice(s, min(s + batch_size, n))
