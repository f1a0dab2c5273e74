"""Diffusion math shared by every method, on plain tensors (no model, no I/O).

Notation follows docs/method.md: ab_t is the cumulative alpha product, x_t = sqrt(ab_t) x0 + sqrt(1-ab_t) eps.
"""

from __future__ import annotations

import torch


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t for per-sample alpha_bar [N]."""
    ab = _bcast(alpha_bar, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def surrogate_eps(eps: torch.Tensor, x_f: torch.Tensor, x_s: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """The noise that would have produced x_t^f from the surrogate (paper Eq. 9-11):
    eps_s = (x_t^f - sqrt(ab) x_s) / sqrt(1-ab) = eps + sqrt(ab / (1-ab)) (x_f - x_s).

    The closed form is used instead of the division so that ab -> 1 stays finite as long as
    ab < 1; note the factor sqrt(SNR_t) grows ~150x near t=0 on a cosine schedule (docs/method.md),
    which is what the timestep weight has to tame."""
    ab = _bcast(alpha_bar, x_f)
    return eps + (ab / (1 - ab)).sqrt() * (x_f - x_s)


def surrogate_velocity(x_t: torch.Tensor, z_s: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Rectified flow (x_t = (1-s) z0 + s eps, v = eps - z0): the velocity that points from the
    surrogate's latents through x_t, v_s = (x_t - z_s) / s (docs/method.md, reconstruction)."""
    return (x_t - z_s) / _bcast(sigma, x_t)


def forget_weight(
    t: torch.Tensor, num_train_timesteps: int, weighting: str = "beta", beta: float = 1.0, lam: float = 0.5
) -> torch.Tensor:
    """lambda_t, the forget term's weight per sample; the remember term gets 1 - lambda_t.

    'beta': (t/T)^beta, T = num_train_timesteps - 1 so the last timestep weighs exactly 1
    (paper IV-A: late timesteps shape generic structure, so forgetting is emphasised there;
    early ones shape details, so remembering is). 'constant': lam for every t (Table III)."""
    if weighting == "constant":
        return torch.full(t.shape, float(lam), dtype=torch.float32, device=t.device)
    if weighting != "beta":
        raise ValueError(f"unknown weighting '{weighting}'; choose 'beta' or 'constant'")
    frac = t.to(torch.float32) / float(num_train_timesteps - 1)
    return frac.clamp(0.0, 1.0) ** float(beta)


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample, up to the constant shared by all samples of one shape."""
    std = _bcast(std, x)
    d = x[0].numel()
    return -0.5 * ((x - mean) / std).pow(2).flatten(1).sum(1) - d * std.flatten().log()
