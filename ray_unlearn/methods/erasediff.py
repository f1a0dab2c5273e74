"""EraseDiff (Wu et al. 2024, arXiv 2401.05779), first-order bilevel form (docs/method.md).

Forget objective f: on noisy forget samples, predict uniform noise u ~ U[0,1) instead of eps.
q(theta) = f(theta) - f(theta^K), theta^K = K inner SGD steps on f; outer step on
F = L_r + lam * q with lam = max(eta - cos(g_r, g_q), 0), or a fixed lam.
"""

from __future__ import annotations

import torch

from ray_unlearn import diffusion, surgery
from ray_unlearn.methods.base import Method, grads_of


class EraseDiff(Method):
    name = "erasediff"

    def _f(self, x_t, t, u):
        return diffusion.per_sample_mse(self.family.predict(x_t, t), u).mean()

    def gradients(self, batch, gen, params):
        x_f = batch["forget"]["x0"]
        x_t, _, t = self.noised(x_f, gen)
        u = torch.rand(x_f.shape, generator=gen).to(x_f.device)
        f0 = self._f(x_t, t, u)
        g_f0 = grads_of(f0, params)
        # theta^K: K SGD steps on f, taken in place and undone afterwards (no model copy).
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, g_f0):
                p.sub_(self.cfg.inner_lr * g)
        for _ in range(self.cfg.inner_steps - 1):
            g = grads_of(self._f(x_t, t, u), params)
            with torch.no_grad():
                for p, gi in zip(params, g):
                    p.sub_(self.cfg.inner_lr * gi)
        fK = self._f(x_t, t, u)
        g_fK = grads_of(fK, params)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        g_q = [a - b for a, b in zip(g_f0, g_fK)]
        loss_r, logs_r = self.remember_loss(batch, gen)
        g_r = grads_of(loss_r, params)
        logs = {"forget/loss": f0.item(), "forget/q": (f0 - fK).item(), **logs_r}
        return g_q, g_r, logs

    def combine(self, g_q, g_r):
        if self.cfg.lam is not None:
            lam = self.cfg.lam
        else:
            nq, nr = surgery.norm_sq(g_q).sqrt(), surgery.norm_sq(g_r).sqrt()
            cos = float(surgery.dot(g_r, g_q) / (nq * nr)) if nq > 0 and nr > 0 else 0.0
            lam = max(self.cfg.eta - cos, 0.0)
        return [r + lam * q for q, r in zip(g_q, g_r)], {"erasediff/lam": float(lam)}
