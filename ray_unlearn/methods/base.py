"""What a method is: its settings, two loss terms on a batch, and how their gradients combine.

A batch is {"forget": {"x0", "x_s", "cond"?}, "remember": {"x0", "cond"?}} in the family's space;
"cond" is the batch part's conditioning (a prompt's embeddings) and is absent or None for an
unconditional model. Every call to `family.predict` passes the part's condition through.

The loop asks for gradients; the default computes the forget and remember gradients with two separate
forward and backward passes (on 2 CPU cores a shared forward with retain_graph was 1.6x slower) and
combines them with `combine`. Methods that need more (EraseDiff's inner steps, SISS's single forward)
override `gradients`. Losses return (loss, {"forget/...": tensor, "remember/...": tensor}): the logged
values are detached 0-dim tensors, so a step costs no host sync; the loop turns them into floats
once per report.

A method is one module: its config class (a `Strict` model with `name: Literal[...]`), its `Method`
subclass naming that class in `config`, and its `presets` (named sets of dotted config values, e.g.
the paper's setup). `ray_unlearn.methods.METHODS` registers it; config.py builds the config union
from that registry.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ray_unlearn import diffusion
from ray_unlearn.families.base import DiffusionFamily
from ray_unlearn.schema import Strict
from ray_unlearn.surgery import Grads

Batch = dict[str, dict[str, Any]]
Logs = dict[str, torch.Tensor]


def grads_of(loss: torch.Tensor, params: list[torch.nn.Parameter], retain_graph: bool = False) -> Grads:
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


def logged(x: torch.Tensor) -> torch.Tensor:
    """A value for the logs: detached, 0-dim, left on its device (no host sync here)."""
    return x.detach().float().mean()


class Method:
    name: ClassVar[str] = ""
    config: ClassVar[type[Strict]]  # the method's settings; its `name` field is Literal[name]
    # Named starting points (dotted config key -> value), applied under the user's YAML and --set:
    # `--preset paper`. "demo" (the defaults) is always available.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    uses_surrogate: ClassVar[bool] = False  # only the paper's method regresses onto an edited surrogate

    def __init__(self, cfg, family: DiffusionFamily):
        self.cfg, self.family = cfg, family
        # The training loop's optimizer, when the loop binds it (EraseDiff's inner steps use it, as
        # the reference does); None otherwise.
        self.optimizer: torch.optim.Optimizer | None = None
        # A frozen copy of the ORIGINAL base network (remember.target='base'): the remember term
        # regresses onto its prediction instead of the noise. None: the noise (the paper's L_r).
        self.teacher: torch.nn.Module | None = None
        # A frozen copy of the SERVING network at the request's start (continual.replay_as 'hold'): on
        # the hold samples (done requests' outputs, noised along their own path) the remember term
        # regresses onto its prediction, so what the serving version already forgot stays where it is.
        self.hold_teacher: torch.nn.Module | None = None

    # helpers shared by the methods ----------------------------------------------------------
    def noised(self, x0: torch.Tensor, gen: torch.Generator, t_min: int = 0, noise: torch.Tensor | None = None):
        """(x_t, noise, t): x0 noised at uniform timesteps >= t_min with Gaussian noise, or `noise`."""
        f = self.family
        t = self.timesteps(len(x0), gen, t_min)
        eps = torch.randn(x0.shape, generator=gen).to(x0.device) if noise is None else noise
        return f.add_noise(x0, eps, t), eps, t

    def timesteps(self, n: int, gen: torch.Generator, t_min: int = 0) -> torch.Tensor:
        """The training timesteps of n samples (the family's own draw; a method may override)."""
        return self.family.sample_timesteps(n, gen, t_min)

    def standard_loss(self, x0: torch.Tensor, gen: torch.Generator, cond=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample denoising loss of clean samples, and their timesteps."""
        x_t, eps, t = self.noised(x0, gen)
        pred = self.family.predict(x_t, t, cond=cond)
        return diffusion.per_sample_mse(pred, self.family.target(x0, eps, t)), t

    def remember_mse(self, part: dict, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample remember error and timesteps: against the noise (`teacher` None, the same
        draws and value as `standard_loss`) or against the frozen base's prediction on the same
        noised sample (anchored)."""
        if self.teacher is None:
            return self.standard_loss(part["x0"], gen, cond=part.get("cond"))
        x_t, _, t = self.noised(part["x0"], gen)
        pred = self.family.predict(x_t, t, cond=part.get("cond"))
        with torch.no_grad():
            anchor = self.family.predict(x_t, t, cond=part.get("cond"), model=self.teacher)
        return diffusion.per_sample_mse(pred, anchor), t

    def hold_mse(self, part: dict, gen: torch.Generator) -> torch.Tensor:
        """Per-sample error of the hold samples: each noised with its own initial noise (on its
        sampling path) at a uniform timestep, against the frozen serving network's prediction."""
        x0 = part["x0"]
        t = self.timesteps(len(x0), gen)
        x_t = self.family.add_noise(x0, part["noise"].to(x0.dtype), t)
        pred = self.family.predict(x_t, t, cond=part.get("cond"))
        with torch.no_grad():
            anchor = self.family.predict(x_t, t, cond=part.get("cond"), model=self.hold_teacher)
        return diffusion.per_sample_mse(pred, anchor)

    def remember_term(self, per_sample: torch.Tensor, batch: Batch, gen: torch.Generator) -> tuple[torch.Tensor, Logs]:
        """The remember loss from its (weighted) per-sample errors: their mean, with the hold
        samples' errors (when the batch has them) counted as that many more remember samples."""
        if "hold" not in batch or self.hold_teacher is None:
            loss = per_sample.mean()
            return loss, {"remember/loss": logged(loss)}
        held = self.hold_mse(batch["hold"], gen)
        loss = torch.cat([per_sample, held]).mean()
        return loss, {"remember/loss": logged(loss), "hold/mse": logged(held.mean())}

    # the interface ----------------------------------------------------------------------------
    def forget_loss(self, batch: Batch, gen: torch.Generator) -> tuple[torch.Tensor, Logs]:
        raise NotImplementedError

    def remember_loss(self, batch: Batch, gen: torch.Generator) -> tuple[torch.Tensor, Logs]:
        mse, _ = self.remember_mse(batch["remember"], gen)
        return self.remember_term(mse, batch, gen)

    def combine(self, g_f: Grads, g_r: Grads) -> tuple[Grads, Logs]:
        return [f + r for f, r in zip(g_f, g_r)], {}

    def gradients(self, batch: Batch, gen: torch.Generator, params: list) -> tuple[Grads, Grads, Logs]:
        """(g_f, g_r, logs) for one micro-batch; the loop accumulates, reduces, then combines."""
        loss_f, logs_f = self.forget_loss(batch, gen)
        g_f = grads_of(loss_f, params)
        loss_r, logs_r = self.remember_loss(batch, gen)
        g_r = grads_of(loss_r, params)
        return g_f, g_r, {**logs_f, **logs_r}
