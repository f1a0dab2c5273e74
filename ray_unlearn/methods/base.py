"""What a method is: two loss terms on a batch, and how their gradients combine.

A batch is {"forget": {"x0", "x_s"}, "remember": {"x0"}} in the family's space. The loop asks for
gradients; the default computes the forget and remember gradients with two separate forward and
backward passes (on 2 CPU cores a shared forward with retain_graph was 1.6x slower) and combines
them with `combine`. Methods that need more (EraseDiff's inner steps, SISS's single forward)
override `gradients`. Losses return (loss, {"forget/...": float, "remember/...": float}).
"""

from __future__ import annotations

import torch

from ray_unlearn import diffusion
from ray_unlearn.families.base import DiffusionFamily
from ray_unlearn.surgery import Grads

Batch = dict[str, dict[str, torch.Tensor]]
Logs = dict[str, float]


def grads_of(loss: torch.Tensor, params: list[torch.nn.Parameter], retain_graph: bool = False) -> Grads:
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


class Method:
    name: str = ""
    uses_surrogate: bool = False  # only the paper's method regresses onto an edited surrogate

    def __init__(self, cfg, family: DiffusionFamily):
        self.cfg, self.family = cfg, family

    # helpers shared by the methods ----------------------------------------------------------
    def noised(self, x0: torch.Tensor, gen: torch.Generator, t_min: int = 0):
        f = self.family
        t = f.sample_timesteps(len(x0), gen, t_min)
        eps = torch.randn(x0.shape, generator=gen).to(x0.device)
        return f.add_noise(x0, eps, t), eps, t

    def standard_loss(self, x0: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample denoising loss of clean samples, and their timesteps."""
        x_t, eps, t = self.noised(x0, gen)
        pred = self.family.predict(x_t, t)
        return diffusion.per_sample_mse(pred, self.family.target(x0, eps, t)), t

    # the interface ----------------------------------------------------------------------------
    def forget_loss(self, batch: Batch, gen: torch.Generator) -> tuple[torch.Tensor, Logs]:
        raise NotImplementedError

    def remember_loss(self, batch: Batch, gen: torch.Generator) -> tuple[torch.Tensor, Logs]:
        loss, _ = self.standard_loss(batch["remember"]["x0"], gen)
        loss = loss.mean()
        return loss, {"remember/loss": loss.item()}

    def combine(self, g_f: Grads, g_r: Grads) -> tuple[Grads, Logs]:
        return [f + r for f, r in zip(g_f, g_r)], {}

    def gradients(self, batch: Batch, gen: torch.Generator, params: list) -> tuple[Grads, Grads, Logs]:
        """(g_f, g_r, logs) for one micro-batch; the loop accumulates, reduces, then combines."""
        loss_f, logs_f = self.forget_loss(batch, gen)
        g_f = grads_of(loss_f, params)
        loss_r, logs_r = self.remember_loss(batch, gen)
        g_r = grads_of(loss_r, params)
        return g_f, g_r, {**logs_f, **logs_r}
