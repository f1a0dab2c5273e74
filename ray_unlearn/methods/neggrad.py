"""NegGrad (Golatkar et al. 2020): descend the remember loss, ascend the ordinary loss on D_f.

This is the seed paper's description (L = L_r - L_f); SISS's code (`simple_neg_del` in
losses/ddpm_deletion_loss.py) ascends the forget loss only, which is forget_weight with no remember
term and is not offered here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ray_unlearn.methods.base import Method, logged
from ray_unlearn.schema import Strict

# The seed paper's setup (V-A): "the learning rate for all baselines was set to [lost from the text]".
# The one baseline learning rate this project can cite is EraseDiff's reference code:
# ddpm/configs/cifar10_erasediff.yml, optim.lr 0.0001 (Adam, grad_clip 1.0). NegGrad and EraseDiff's
# paper presets use it.
BASELINE_LR = 1e-4


class NegGradConfig(Strict):
    """NegGrad (Golatkar et al. 2020): L = L_r - alpha * L_f."""

    name: Literal["neggrad"] = "neggrad"
    # alpha 1: the plain form L_r - L_f of the seed paper's related work (Golatkar et al. 2020).
    forget_weight: float = Field(1.0, gt=0.0, description="alpha, weight of the ascended forget loss.")


class NegGrad(Method):
    name = "neggrad"
    config = NegGradConfig
    # The seed paper (V-A): NegGrad trained for 10 steps at the baselines' learning rate.
    presets = {"paper": {"train.extra_rounds": 0, "train.steps": 10, "train.lr": BASELINE_LR, "train.optimizer": "adam"}}

    def forget_loss(self, batch, gen):
        part = batch["forget"]
        mse, _ = self.standard_loss(part["x0"], gen, cond=part.get("cond"))
        loss = -self.cfg.forget_weight * mse.mean()
        return loss, {"forget/loss": logged(loss), "forget/mse": logged(mse)}
