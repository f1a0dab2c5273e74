"""NegGrad (Golatkar et al. 2020): descend the remember loss, ascend the ordinary loss on D_f."""

from __future__ import annotations

from ray_unlearn.methods.base import Method


class NegGrad(Method):
    name = "neggrad"

    def forget_loss(self, batch, gen):
        mse, _ = self.standard_loss(batch["forget"]["x0"], gen)
        loss = -self.cfg.forget_weight * mse.mean()
        return loss, {"forget/loss": loss.item(), "forget/mse": mse.mean().item()}
