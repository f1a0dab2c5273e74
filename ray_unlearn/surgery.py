"""Gradient surgery on lists of per-parameter gradients (paper Eq. 12-13; Table IV).

Gradients stay as the parameters' own tensors: inner products are summed per tensor, so the flat
vector over all parameters is never materialised (it would double peak memory on a large UNet).
"""

from __future__ import annotations

import torch

Grads = list[torch.Tensor]
MODES = ("none", "project_forget", "pcgrad")


def dot(a: Grads, b: Grads) -> torch.Tensor:
    """<a, b> over all tensors: per-tensor dots in the gradients' dtype, summed in float64
    (one device sync when the result is compared, not one per parameter)."""
    return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b, strict=True)]).double().sum()


def norm_sq(a: Grads) -> torch.Tensor:
    return dot(a, a)


def axpy(alpha: torch.Tensor | float, x: Grads, y: Grads) -> Grads:
    """y + alpha * x, a new list."""
    return list(torch._foreach_add(list(y), list(x), alpha=float(alpha)))


def project_conflict(g: Grads, onto: Grads, d: torch.Tensor | None = None, n: torch.Tensor | None = None) -> Grads:
    """g minus its component along `onto` when the two conflict (<g, onto> < 0); else g itself."""
    d = dot(g, onto) if d is None else d
    n = norm_sq(onto) if n is None else n
    if d >= 0 or n == 0:
        return list(g)
    return axpy(-d / n, onto, g)


def combine(g_f: Grads, g_r: Grads, mode: str = "project_forget") -> tuple[Grads, dict[str, torch.Tensor]]:
    """The step direction g_r + g_f after surgery, with the cosine of the raw pair for logging.

    'project_forget': g_f <- g_f - (<g_f,g_r>/||g_r||^2) g_r if <g_f,g_r> < 0 (the paper's choice:
    the remember gradient is never bent). 'pcgrad': both are projected off the other's original
    (Yu et al. 2020). 'none': plain sum.

    No host sync: whether the pair conflicts is decided on the device (the projection coefficient
    is 0 when it does not), and the logs are 0-dim tensors that the loop brings to the host with
    the step's other logs, once (`loop.materialize`)."""
    if mode not in MODES:
        raise ValueError(f"unknown surgery mode '{mode}'; choose one of {MODES}")
    d = dot(g_f, g_r)
    nf, nr = norm_sq(g_f), norm_sq(g_r)
    denom = nf.sqrt() * nr.sqrt()
    zero = torch.zeros_like(d)
    conflict = d < 0
    logs = {"surgery/cos": torch.where(denom > 0, d / denom.clamp_min(1e-300), zero).float(),
            "surgery/conflict": conflict.float()}
    if mode == "none":
        return list(torch._foreach_add(list(g_f), list(g_r))), logs
    f_new = _off(g_f, g_r, torch.where(conflict & (nr > 0), d / nr.clamp_min(1e-300), zero))
    r_new = _off(g_r, g_f, torch.where(conflict & (nf > 0), d / nf.clamp_min(1e-300), zero)) if mode == "pcgrad" else g_r
    return list(torch._foreach_add(f_new, list(r_new))), logs


def _off(g: Grads, onto: Grads, coef: torch.Tensor) -> Grads:
    """g - coef * onto, with coef a 0-dim tensor (0 when there is nothing to remove), no host sync."""
    return list(torch._foreach_sub(list(g), torch._foreach_mul(list(onto), coef.to(onto[0].dtype))))
