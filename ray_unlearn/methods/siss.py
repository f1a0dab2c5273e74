"""SISS (Alberti et al., ICLR 2025): one forward on a sample of the mixture
q_lam(m | x, a) = (1 - lam) q(m | x) + lam q(m | a), importance-weighted remember and forget terms.

Timesteps are sampled uniformly (SISS's public code draws t = 999 every step, which looks like a bug;
docs/method.md). The forget gradient is rescaled to a fixed norm before it is subtracted.
"""

from __future__ import annotations

import math

import torch

from ray_unlearn import diffusion, surgery
from ray_unlearn.methods.base import Method, grads_of


class SISS(Method):
    name = "siss"

    def gradients(self, batch, gen, params):
        f, lam = self.family, self.cfg.mix_lambda
        x = batch["remember"]["x0"]
        a = batch["forget"]["x0"]
        a = a[torch.arange(len(x)) % len(a)]  # pair every remember sample with a forget sample
        t = f.sample_timesteps(len(x), gen)
        eps = torch.randn(x.shape, generator=gen).to(x.device)
        from_a = (torch.rand(len(x), generator=gen) < lam).to(x.device)
        src = torch.where(from_a.view(-1, *[1] * (x.ndim - 1)), a, x)
        m = f.add_noise(src, eps, t)
        ab = f.alpha_bar(t)
        mean_scale = ab.sqrt().view(-1, *[1] * (x.ndim - 1))
        std = (1 - ab).sqrt()
        log_qx = diffusion.gaussian_log_density(m, mean_scale * x, std)
        log_qa = diffusion.gaussian_log_density(m, mean_scale * a, std)
        log_mix = torch.logaddexp(math.log(1 - lam) + log_qx, math.log(lam) + log_qa)
        w_x, w_a = (log_qx - log_mix).exp().detach(), (log_qa - log_mix).exp().detach()
        pred = f.predict(m, t)
        eps_x = f.target(x, (m - mean_scale * x) / std.view_as(mean_scale), t)
        eps_a = f.target(a, (m - mean_scale * a) / std.view_as(mean_scale), t)
        loss_r = (w_x * diffusion.per_sample_mse(pred, eps_x)).mean()
        loss_f = -self.cfg.scale * (w_a * diffusion.per_sample_mse(pred, eps_a)).mean()
        g_f = grads_of(loss_f, params, retain_graph=True)
        g_r = grads_of(loss_r, params)
        logs = {"forget/loss": loss_f.item(), "remember/loss": loss_r.item(), "siss/w_a": w_a.mean().item()}
        return g_f, g_r, logs

    def combine(self, g_f, g_r):
        target = self.cfg.forget_grad_norm
        if target is not None:
            n = float(surgery.norm_sq(g_f).sqrt())
            if n > 0:
                g_f = [g * (target / n) for g in g_f]
        return [a + b for a, b in zip(g_f, g_r)], {}
