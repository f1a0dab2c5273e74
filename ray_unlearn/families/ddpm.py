"""Unconditional pixel-space DDPM (diffusers UNet2DModel, epsilon prediction), full or LoRA."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    DDIMInverseScheduler,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    SchedulerMixin,
    UNet2DModel,
)
from torch import nn
from tqdm.auto import tqdm

from ray_unlearn import diffusion
from ray_unlearn.hashing import content_hash
from ray_unlearn.config import DEMO_MODEL, LoraSettings, ModelConfig, SamplerConfig
from ray_unlearn.families.base import DiffusionFamily

ASSETS = Path(__file__).resolve().parent.parent / "assets"
# The shipped unconditional demo models, by the name `model.path` takes; "demo" is the default one.
DEMO_DIRS = {"demo-lfw": ASSETS / "demo-lfw32", "demo-faces": ASSETS / "demo-faces32"}
DEMO_DIRS[DEMO_MODEL] = DEMO_DIRS["demo-faces"]
DEMO_DIR = DEMO_DIRS[DEMO_MODEL]
# DDIM steps of the reference sampler (the paper evaluates with DDIM, 50 steps)
REFERENCE_DDIM_STEPS = 50


class ModelLoadError(RuntimeError):
    pass


def resolve_model_path(path: str) -> str:
    """'demo' (or another shipped name, DEMO_DIRS) -> the shipped model; a local directory stays;
    anything else is a hub id."""
    if path in DEMO_DIRS:
        d = DEMO_DIRS[path]
        if not (d / "model_index.json").is_file():
            raise ModelLoadError(
                f"the demo model '{path}' is missing from {d}; reinstall ray_unlearn or retrain it "
                "with `python jobs/train_demo_model.py` (its model card has the command)"
            )
        return str(d)
    return path


def load_unet_and_scheduler(path: str, revision: str | None = None) -> tuple[UNet2DModel, SchedulerMixin]:
    """A diffusers DDPM: a pipeline directory (model_index.json + unet/ + scheduler/), the older
    flat layout (config.json + scheduler_config.json at the root), or a hub id of either."""
    src = resolve_model_path(path)
    local = Path(src).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"{src} is a file; give a diffusers model directory or a hub id")
    errors = []
    try:
        pipe = DDPMPipeline.from_pretrained(src, revision=revision)
        return pipe.unet, pipe.scheduler
    except Exception as err:  # fall back to the flat layout before giving up
        errors.append(f"as a pipeline: {err}")
    try:
        unet = UNet2DModel.from_pretrained(src, revision=revision)
        scheduler = DDPMScheduler.from_pretrained(src, revision=revision)
        return unet, scheduler
    except Exception as err:
        errors.append(f"as a flat UNet2DModel: {err}")
    hint = (
        "no such local directory, and the hub could not provide it (offline? set HF_HOME to a "
        "cache that holds it, or download it with `huggingface-cli download ID --local-dir DIR`)"
        if not local.exists()
        else "the directory is not a diffusers DDPM (expected model_index.json with unet/ and scheduler/)"
    )
    raise ModelLoadError(f"could not load a DDPM from '{path}': {hint}\n  " + "\n  ".join(errors))


def weights_fingerprint(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class DDPMFamily(DiffusionFamily):
    name = "ddpm"

    def __init__(
        self,
        cfg: ModelConfig,
        sampler: SamplerConfig | None = None,
        device: str | torch.device = "cpu",
        dtype_autocast: torch.dtype | None = None,
        unet: UNet2DModel | None = None,
        scheduler: SchedulerMixin | None = None,
    ):
        self.cfg, self.sampler = cfg, sampler or SamplerConfig()
        self.device = torch.device(device)
        self.autocast_dtype = dtype_autocast
        if unet is None:
            unet, scheduler = load_unet_and_scheduler(cfg.path, cfg.revision)
        self.scheduler = DDPMScheduler.from_config(scheduler.config) if scheduler is not None else DDPMScheduler()
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self._alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self._fingerprint = weights_fingerprint(unet)
        unet = unet.to(self.device).train()
        self.lora = cfg.lora
        if cfg.lora is not None:
            self.model = attach_lora(unet, cfg.lora)
        else:
            self.model = unet.requires_grad_(True)
        self.channels = int(unet.config.in_channels)
        size = unet.config.sample_size
        self.size = tuple(size) if isinstance(size, (list, tuple)) else (int(size), int(size))

    # --- data space -------------------------------------------------------------------------
    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if images.shape[1] != self.channels:
            if self.channels == 1:  # ITU-R 601 luma, what PIL's "L" conversion does
                w = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
                images = (images[:, :3] * w).sum(1, keepdim=True) if images.shape[1] >= 3 else images[:, :1]
            elif images.shape[1] == 1:
                images = images.repeat(1, self.channels, 1, 1)
            else:
                images = images[:, : self.channels]
        if tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return images.clamp(0, 1).to(self.device)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device) * 2 - 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() + 1) / 2).clamp(0, 1)

    # --- training ---------------------------------------------------------------------------
    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        return self._alphas_cumprod[t.to(self.device)]

    def add_noise(self, x0, eps, t):
        return diffusion.add_noise(x0, eps, self.alpha_bar(t))

    def target(self, x0, eps, t):
        return eps

    def surrogate_target(self, x_f, x_s, eps, t):
        return diffusion.surrogate_eps(eps, x_f, x_s, self.alpha_bar(t))

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def predict(self, x_t, t, cond=None, model: nn.Module | None = None):
        with self.autocast():
            return (model or self.model)(x_t, t).sample.float()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # --- sampling ---------------------------------------------------------------------------
    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        shape = (self.channels, *self.size)
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    def _ddim(self, steps: int | None = None) -> DDIMScheduler:
        ddim = DDIMScheduler.from_config(self.scheduler.config)
        ddim.set_timesteps(steps or self.sampler.steps, device=self.device)
        return ddim

    def _solver(self) -> SchedulerMixin:
        """A fresh scheduler for one sampling batch (multistep solvers keep state between steps)."""
        if self.sampler.kind == "ddim":
            return self._ddim()
        # DPM-Solver++ 2M; thresholding at sample_max_value 1 is the x0 clipping DDIM does with
        # clip_sample (pixel-space models: diffusers recommends thresholding for DPM-Solver++)
        clip = bool(self.scheduler.config.get("clip_sample", False))
        solver = DPMSolverMultistepScheduler.from_config(
            self.scheduler.config, algorithm_type=self.sampler.kind, solver_order=2,
            thresholding=clip, sample_max_value=float(self.scheduler.config.get("clip_sample_range", 1.0)),
        )
        solver.set_timesteps(self.sampler.steps, device=self.device)
        return solver

    def _stochastic(self) -> bool:
        return self.sampler.kind == "sde-dpmsolver++" or (self.sampler.kind == "ddim" and self.sampler.eta > 0)

    def _noise_generators(self, seeds: list[int]) -> list[torch.Generator] | None:
        """Per-sample generators for the sampler's noise (DDIM eta > 0, SDE solvers), so a sample
        never depends on its batch. They live on the sampling device: on a GPU, per-sample noise
        drawn on the host each step would cost more than the UNet step at large batches (on CPU
        the stream is the same as ever)."""
        if not self._stochastic():
            return None
        return [torch.Generator(device=self.device).manual_seed(int(s) & 0xFFFF_FFFF_FFFF) for s in seeds]

    def sampling_model(self, model: nn.Module | None = None) -> nn.Module:
        """The UNet to sample with: compiled once per module when `sampler.compile` is set."""
        model = model or self.model
        if not self.sampler.compile:
            return model
        cache = self.__dict__.setdefault("_compiled", {})
        if id(model) not in cache:
            cache[id(model)] = (model, torch.compile(model))
        return cache[id(model)][1]

    @torch.no_grad()
    def _denoise(self, x, timesteps, solver: SchedulerMixin, model: nn.Module, gens) -> torch.Tensor:
        net = self.sampling_model(model)
        for t in timesteps:
            eps = self.predict(x, t.expand(len(x)), model=net)
            var = None
            if gens is not None:
                var = torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device) for g in gens]).to(x.device, x.dtype)
            if isinstance(solver, DDIMScheduler):
                x = solver.step(eps, t, x, eta=self.sampler.eta, variance_noise=var).prev_sample
            else:
                x = solver.step(eps, t, x, variance_noise=var).prev_sample
        return x

    def evaluations_per_image(self) -> int:
        """Network evaluations one generated image costs with the configured sampler."""
        return len(self._solver().timesteps)

    @torch.no_grad()
    def generate(self, noise, *, model=None, progress=None) -> torch.Tensor:
        model = model or self.model
        was_training = model.training
        model.eval()
        out = []
        bs = self.sampler.batch_size
        chunks = range(0, len(noise), bs)
        for i in tqdm(chunks, desc=progress, disable=progress is None or len(chunks) == 0, leave=False):
            solver = self._solver()
            chunk = noise[i : i + bs]
            n = len(chunk)
            # the sampler noise of a sample is seeded by its initial noise: reproducible per sample
            seeds = [int(content_hash(c)[:12], 16) for c in chunk]
            if self.sampler.compile and n < bs and len(noise) > bs:
                # a compiled UNet sees one batch shape (one compilation): pad the last batch with
                # zero noise and drop those outputs (samples are batch-independent)
                chunk = torch.cat([chunk, chunk.new_zeros(bs - n, *chunk.shape[1:])])
                seeds += [0] * (bs - n)
            gens = self._noise_generators(seeds)
            x = chunk.to(self.device) * solver.init_noise_sigma
            out.append(self.decode(self._denoise(x, solver.timesteps, solver, model, gens))[:n].cpu())
        model.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.channels, *self.size)

    @torch.no_grad()
    def invert(self, images, model=None):
        """DDIM inversion (eta 0 run from t=0 up to T) at the verifier's DDIM step count: each image's
        initial noise, approximately (on the demo model, cosine to the true one: median 0.93, range
        0.43-0.99 over 16 seeds, docs/method.md)."""
        model = model or self.model
        steps = self.sampler.steps if self.sampler.kind == "ddim" else REFERENCE_DDIM_STEPS
        inverse = DDIMInverseScheduler.from_config(self.scheduler.config)
        inverse.set_timesteps(steps, device=self.device)
        was_training = model.training
        model.eval()
        out = []
        for i in range(0, len(images), self.sampler.batch_size):  # batches of the sampler's size, as generate
            x = self.encode(self.prepare_images(images[i : i + self.sampler.batch_size])).to(self.device)
            for t in inverse.timesteps:
                x = inverse.step(self.predict(x, t.expand(len(x)), model=model), t, x).prev_sample
            out.append(x.cpu())
        model.train(was_training)
        return torch.cat(out)

    @torch.no_grad()
    def sdedit(self, images, strength, seed, model=None):
        """SDEdit (Meng et al. 2022): noise to t0 = strength*T, denoise with DDIM from there. Always
        DDIM (it makes training data: surrogates), at sampler.steps, or at the reference
        REFERENCE_DDIM_STEPS when a fast solver is configured for verification."""
        model = model or self.model
        x0 = self.encode(self.prepare_images(images))
        if strength <= 0:
            return self.decode(x0).cpu()
        steps = self.sampler.steps if self.sampler.kind == "ddim" else REFERENCE_DDIM_STEPS
        ddim = self._ddim(steps)
        n_keep = max(1, min(len(ddim.timesteps), round(steps * strength)))
        timesteps = ddim.timesteps[len(ddim.timesteps) - n_keep :]
        g = torch.Generator().manual_seed(int(seed))
        eps = torch.randn(x0.shape, generator=g).to(self.device)
        x = ddim.add_noise(x0, eps, timesteps[:1].expand(len(x0)))
        was_training = model.training
        model.eval()
        gens = None
        if self.sampler.eta > 0:
            gens = [torch.Generator(device=self.device).manual_seed(int(s) & 0xFFFF_FFFF_FFFF)
                    for s in (seed * 100_003 + i for i in range(len(x)))]
        out = self._denoise(x, timesteps, ddim, model, gens)
        model.train(was_training)
        return self.decode(out).cpu()

    # --- persistence ------------------------------------------------------------------------
    def merged_unet(self) -> UNet2DModel:
        if self.lora is None:
            return self.model
        return copy.deepcopy(self.model).merge_and_unload()

    def save(self, out_dir) -> dict:
        out_dir = Path(out_dir)
        unet = self.merged_unet()
        DDPMPipeline(unet=unet, scheduler=self.scheduler).save_pretrained(out_dir, safe_serialization=True)
        adapter = None
        if self.lora is not None:
            adapter = out_dir / "lora_adapter"
            self.model.save_pretrained(adapter)
        return {"hotfix": str(out_dir), "adapter": str(adapter) if adapter else None}

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict:
        return {
            "family": self.name,
            "path": self.cfg.path,
            "resolved": resolve_model_path(self.cfg.path),
            "fingerprint": self._fingerprint,
            "params": sum(p.numel() for p in self.model.parameters()),
            "trainable": sum(p.numel() for p in self.trainable_parameters()),
            "lora": self.lora.model_dump() if self.lora else None,
        }


def attach_lora(unet: UNet2DModel, lora: LoraSettings) -> nn.Module:
    """A peft LoRA on the UNet; only the adapter trains. diffusers' UNet2DModel has no
    PeftAdapterMixin, so peft wraps it directly (PeftModel forwards calls to the UNet)."""
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in unet.named_modules()} | {n for n, _ in unet.named_modules()}
    present = [m for m in lora.target_modules if m in names or any(n.endswith("." + m) for n, _ in unet.named_modules())]
    if not present:
        raise ModelLoadError(
            f"none of the LoRA target modules {lora.target_modules} exist in this UNet; set "
            "model.lora.target_modules to names such as to_q, to_k, to_v, conv1, conv2"
        )
    cfg = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=present)
    return get_peft_model(unet, cfg)


def save_pipeline_info(out_dir: Path, info: dict) -> None:
    (Path(out_dir) / "ray_unlearn.json").write_text(json.dumps(info, indent=2) + "\n")
