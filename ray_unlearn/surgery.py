"""Gradient surgery on lists of per-parameter gradients (paper Eq. 12-13; Table IV).

Gradients stay as the parameters' own tensors: inner products are summed per tensor, so the flat
vector over all parameters is never materialised (it would double peak memory on a large UNet).
"""

from __future__ import annotations

import torch

Grads = list[torch.Tensor]
MODES = ("none", "project_forget", "pcgrad")


def dot(a: Grads, b: Grads) -> torch.Tensor:
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True))


def norm_sq(a: Grads) -> torch.Tensor:
    return dot(a, a)


def axpy(alpha: torch.Tensor | float, x: Grads, y: Grads) -> Grads:
    """y + alpha * x, a new list."""
    return [yi + (alpha * xi.double()).to(yi.dtype) for xi, yi in zip(x, y, strict=True)]


def project_conflict(g: Grads, onto: Grads, d: torch.Tensor | None = None) -> Grads:
    """g minus its component along `onto` when the two conflict (<g, onto> < 0); else g itself."""
    d = dot(g, onto) if d is None else d
    n = norm_sq(onto)
    if d >= 0 or n == 0:
        return list(g)
    return axpy(-d / n, onto, g)


def combine(g_f: Grads, g_r: Grads, mode: str = "project_forget") -> tuple[Grads, dict[str, float]]:
    """The step direction g_r + g_f after surgery, with the cosine of the raw pair for logging.

    'project_forget': g_f <- g_f - (<g_f,g_r>/||g_r||^2) g_r if <g_f,g_r> < 0 (the paper's choice:
    the remember gradient is never bent). 'pcgrad': both are projected off the other's original
    (Yu et al. 2020). 'none': plain sum."""
    if mode not in MODES:
        raise ValueError(f"unknown surgery mode '{mode}'; choose one of {MODES}")
    d = dot(g_f, g_r)
    nf, nr = norm_sq(g_f), norm_sq(g_r)
    cos = float(d / (nf.sqrt() * nr.sqrt())) if nf > 0 and nr > 0 else 0.0
    logs = {"surgery/cos": cos, "surgery/conflict": float(d < 0)}
    if mode == "none" or d >= 0:
        return [f + r for f, r in zip(g_f, g_r, strict=True)], logs
    f_new = project_conflict(g_f, g_r, d)
    r_new = project_conflict(g_r, g_f, d) if mode == "pcgrad" else g_r
    return [f + r for f, r in zip(f_new, r_new, strict=True)], logs
