"""The paper's method ("Unlearning the Unpromptable", docs/method.md): surrogate forget loss, timestep
weighting lambda_t, gradient surgery on the forget gradient."""

from __future__ import annotations

from ray_unlearn import diffusion, surgery
from ray_unlearn.config import SurrogateMethodConfig
from ray_unlearn.methods.base import Method


class SurrogateMethod(Method):
    name = "surrogate"
    uses_surrogate = True
    cfg: SurrogateMethodConfig

    def _weight(self, t):
        c = self.cfg
        return diffusion.forget_weight(t, self.family.num_train_timesteps, c.weighting, c.beta, c.lam)

    def forget_loss(self, batch, gen):
        f = self.family
        x_f, x_s = batch["forget"]["x0"], batch["forget"]["x_s"]
        x_t, eps, t = self.noised(x_f, gen, self.cfg.forget_t_min)
        mse = diffusion.per_sample_mse(f.predict(x_t, t), f.surrogate_target(x_f, x_s, eps, t))
        w = self._weight(t)
        loss = (w * mse).mean()
        return loss, {"forget/loss": loss.item(), "forget/mse": mse.mean().item(), "forget/weight": w.mean().item()}

    def remember_loss(self, batch, gen):
        mse, t = self.standard_loss(batch["remember"]["x0"], gen)
        w = 1 - self._weight(t)
        loss = (w * mse).mean()
        return loss, {"remember/loss": loss.item(), "remember/mse": mse.mean().item()}

    def combine(self, g_f, g_r):
        return surgery.combine(g_f, g_r, self.cfg.surgery)
