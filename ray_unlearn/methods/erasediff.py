"""EraseDiff (Wu et al. 2024, arXiv 2401.05779) as its reference code computes it
(JingWu321/EraseDiff, ddpm/runners/diffusion.py, `Diffusion.train_ours`; docs/method.md).

Forget objective f: noise a forget sample with uniform u ~ U[0,1) in place of Gaussian eps and
regress onto u (`noise_u = torch.rand_like(images_u)` passed as the loss's noise `e`).
Bilevel step: K inner passes of the outer optimizer on f give theta^K; the average f during the last
pass is a detached constant c (`loss_q = loss_du - unl_losses.avg.detach()`), so with
q(theta) = f(theta) - c the outer gradient is

    g = grad L_r + lam * grad f(theta)

with a fixed lam (`--lambda_bome 0.1`) or the adaptive lam = max(eta - cos(grad L_r, grad q), 0).
The parameters are restored after the inner passes (`set_param(model, param_i)`) but the optimizer
state is not: the inner steps reach the outer step through the optimizer's moments. That is why the
inner passes use the loop's own optimizer when the loop binds it (`Method.optimizer`).
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field

from ray_unlearn import diffusion, surgery
from ray_unlearn.methods.base import Method, grads_of, logged
from ray_unlearn.methods.neggrad import BASELINE_LR
from ray_unlearn.schema import Strict

log = logging.getLogger(__name__)

_REF = "JingWu321/EraseDiff"


class EraseDiffConfig(Strict):
    """EraseDiff (Wu et al. 2024): uniform-noise forget target, first-order bilevel step."""

    name: Literal["erasediff"] = "erasediff"
    inner_steps: int = Field(
        2, ge=0,
        description=f"K inner passes on the forget loss ({_REF} ddpm/main.py line 23: --K_steps default 2). "
        "They only set the constant f(theta^K) and, through the optimizer's state, the outer step; 0 skips them.",
    )
    lam: float | None = Field(
        0.1, ge=0.0,
        description=f"Fixed weight of q ({_REF} ddpm/main.py line 25: --lambda_bome default 0.1); "
        "null = the adaptive rule lam = max(eta - cos(g_r, g_q), 0) (used by the reference when lambda_bome < 0).",
    )
    eta: float = Field(
        0.1, ge=0.0,
        description=f"eta of the adaptive rule, used when lam is null ({_REF} ddpm/main.py line 26: --eta_bome 0.1).",
    )
    forget_noise: Literal["reference", "siss_port"] = Field(
        "reference",
        description="'reference': noise the forget sample with uniform u and regress onto u "
        f"({_REF} ddpm/runners/diffusion.py, train_ours: `noise_u = torch.rand_like(images_u)` as the loss's "
        "noise); 'siss_port': noise with Gaussian eps and regress onto an independent u (SISS's port, "
        "claserken/SISS losses/ddpm_deletion_loss.py `erasediff`).",
    )
    timesteps: Literal["antithetic", "uniform"] = Field(
        "antithetic",
        description=f"'antithetic': draw n//2+1 uniform timesteps t and use t and T-1-t ({_REF} "
        "ddpm/runners/diffusion.py, train_ours: `t = torch.cat([t, self.num_timesteps - t - 1], dim=0)[:n]`, for "
        "both the remember and the forget batch); 'uniform': n independent draws (the other methods' choice).",
    )
    inner_lr: float = Field(
        BASELINE_LR, gt=0.0,
        description="Learning rate of the inner Adam when no loop optimizer is bound (the reference uses the "
        "outer optimizer itself: ddpm/configs/cifar10_erasediff.yml optim Adam lr 1e-4).",
    )


class EraseDiff(Method):
    name = "erasediff"
    config = EraseDiffConfig
    # The seed paper (V-A): EraseDiff trained 60 steps at the baselines' learning rate; the reference's
    # optimizer is Adam (cifar10_erasediff.yml), gradient clipping 1.0 (the loop's default).
    presets = {"paper": {"train.extra_rounds": 0, "train.steps": 60, "train.lr": BASELINE_LR, "train.optimizer": "adam"}}
    cfg: EraseDiffConfig

    def timesteps(self, n: int, gen: torch.Generator, t_min: int = 0) -> torch.Tensor:
        f = self.family
        if self.cfg.timesteps == "uniform":
            return f.sample_timesteps(n, gen, t_min)
        t = f.sample_timesteps(n, gen, t_min)
        if t.is_floating_point():  # a flow family's shifted sigmas: T-1-t is not a draw of the same law
            return t
        first = t[: n // 2 + 1]
        return torch.cat([first, f.num_train_timesteps - 1 - first])[:n].clamp(min=t_min)

    def _noised_forget(self, x0, gen):
        """(x_t, target, t) of the forget objective f."""
        f = self.family
        u = torch.rand(x0.shape, generator=gen).to(x0.device)
        if self.cfg.forget_noise == "reference":
            x_t, _, t = self.noised(x0, gen, noise=u)
            return x_t, f.target(x0, u, t), t
        x_t, _, t = self.noised(x0, gen)
        return x_t, f.target(x0, u, t), t  # = u for epsilon prediction; u - x0 for a velocity model

    def _f(self, part, gen) -> torch.Tensor:
        x_t, target, t = self._noised_forget(part["x0"], gen)
        return diffusion.per_sample_mse(self.family.predict(x_t, t, cond=part.get("cond")), target).mean()

    def _inner_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        if getattr(self, "_own", None) is None:
            log.warning("erasediff: no loop optimizer bound; the inner passes use their own Adam "
                        "(lr %g), whose state does not reach the outer step", self.cfg.inner_lr)
            self._own = torch.optim.Adam(params, lr=self.cfg.inner_lr)
        return self._own

    def inner_passes(self, batch, gen, params) -> torch.Tensor | None:
        """K optimizer steps on f, parameters restored afterwards; returns f during the last pass
        (the reference's `unl_losses.avg`), detached, or None when K = 0."""
        if self.cfg.inner_steps == 0:
            return None
        opt = self._inner_optimizer(params)
        saved = [p.detach().clone() for p in params]
        last = None
        for _ in range(self.cfg.inner_steps):
            loss = self._f(batch["forget"], gen)
            for p, g in zip(params, grads_of(loss, params)):
                p.grad = g.to(p.dtype)
            opt.step()
            opt.zero_grad(set_to_none=True)
            last = loss.detach()
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        return last

    def gradients(self, batch, gen, params):
        c = self.inner_passes(batch, gen, params)
        f0 = self._f(batch["forget"], gen)
        g_q = grads_of(f0, params)  # grad q = grad f(theta): f(theta^K) is a constant
        loss_r, logs_r = self.remember_loss(batch, gen)
        g_r = grads_of(loss_r, params)
        logs = {"forget/loss": logged(f0), **logs_r}
        if c is not None:
            logs["forget/q"] = logged(f0.detach() - c)
        return g_q, g_r, logs

    def combine(self, g_q, g_r):
        if self.cfg.lam is not None:
            lam = torch.tensor(float(self.cfg.lam))
        else:  # the reference's form: cos = <g_r, g_q> / (|g_r| |g_q| + 1e-8)
            cos = surgery.dot(g_r, g_q) / (surgery.norm_sq(g_r).sqrt() * surgery.norm_sq(g_q).sqrt() + 1e-8)
            lam = (self.cfg.eta - cos).clamp(min=0.0)
        return [r + lam.to(r.dtype) * q for q, r in zip(g_q, g_r)], {"erasediff/lam": logged(lam)}
