"""What the unlearning loop needs from a model family, and nothing more.

A family hides how images become model inputs (pixels or VAE latents), how a sample is noised,
what the network regresses onto (epsilon, velocity), how it is conditioned, and which parameters
train. The methods and the loop speak only this interface, so Stable Diffusion 3 (latents,
rectified flow, text conditioning, LoRA) plugs in as another subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


class FrozenWeights(nn.Module):
    """The network as it stands now, frozen, for a teacher: a copy of only the parameters that train
    (with a LoRA, the adapter: megabytes, where a copy of an SD3 transformer is gigabytes), run
    through the live network with `torch.func.functional_call` in eval mode. Training the live
    network later leaves it where it was; what does not train is shared, never copied."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self._live = (model,)  # a tuple, not a submodule: eval()/requires_grad_ here must not reach it
        self.frozen = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def weights(self) -> dict[str, torch.Tensor]:
        """Every parameter as the teacher sees it (the frozen ones, the live rest)."""
        return {n: self.frozen.get(n, p.detach()) for n, p in self._live[0].named_parameters()}

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        model = self._live[0]
        was = model.training
        model.eval()
        try:
            return torch.func.functional_call(model, self.frozen, args, kwargs)
        finally:
            model.train(was)


class DiffusionFamily(ABC):
    name: str
    num_train_timesteps: int
    model: nn.Module  # the network being fine-tuned (with adapters when LoRA is on)
    device: torch.device

    # --- data space -------------------------------------------------------------------------
    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0,1], NCHW as prepared by `prepare_images` -> the space diffusion runs in."""

    @abstractmethod
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `encode`, clamped to [0,1]."""

    @abstractmethod
    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """Any float NCHW image in [0,1] -> the channels and size the model takes."""

    # --- training ---------------------------------------------------------------------------
    def sample_timesteps(self, n: int, generator: torch.Generator, t_min: int = 0) -> torch.Tensor:
        t_min = min(max(int(t_min), 0), self.num_train_timesteps - 1)
        return torch.randint(t_min, self.num_train_timesteps, (n,), generator=generator).to(self.device)

    @abstractmethod
    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def target(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network regresses onto for a clean sample x0 (epsilon, or velocity)."""

    @abstractmethod
    def surrogate_target(
        self, x_f: torch.Tensor, x_s: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Target that makes noisy x_f denoise toward the surrogate x_s (docs/method.md forget loss)."""

    @abstractmethod
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor: ...

    @abstractmethod
    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """Signal fraction of x_t per sample (used by SISS's densities)."""

    def noise_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, b_t) per sample with x_t = a_t x0 + b_t eps: the mean scale and std of q(x_t | x0)
        (SISS's mixture densities). DDPM: (sqrt(ab_t), sqrt(1 - ab_t)); rectified flow: (1 - sigma, sigma)."""
        ab = self.alpha_bar(t)
        return ab.sqrt(), (1 - ab).sqrt()

    @contextmanager
    def editing(self, prompt: str | None):
        """Within: SDEdit is prompted with `prompt` (conditional families); unconditional ones ignore it."""
        yield

    def condition(self, prompts: list[str]):
        """A batch condition for these prompts, indexable like the samples; None when unconditional."""
        return None

    @abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]: ...

    # --- sampling ---------------------------------------------------------------------------
    @abstractmethod
    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """One initial noise per seed, independent of batching (a CPU generator per seed)."""

    @abstractmethod
    def generate(self, noise: torch.Tensor, *, model: nn.Module | None = None, progress: str | None = None) -> torch.Tensor:
        """Deterministic sampling from given initial noises -> images in [0,1]."""

    @abstractmethod
    def sdedit(self, images: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
        """Noise images to strength*T and denoise with the base model."""

    def invert(self, images: torch.Tensor) -> torch.Tensor | None:
        """The initial noise the deterministic sampler would take to each image (images in [0,1]),
        or None when the family cannot invert."""
        return None

    # --- persistence ------------------------------------------------------------------------
    @abstractmethod
    def save(self, out_dir: str | Path) -> dict:
        """Write the hotfix; returns {"hotfix": dir, "adapter": dir | None}."""

    @abstractmethod
    def fingerprint(self) -> str:
        """Content hash of the base weights (cache key for base-model samples)."""
