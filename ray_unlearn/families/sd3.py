"""Stable Diffusion 3 (diffusers `StableDiffusion3Pipeline`): VAE latents, rectified flow, text
conditioning, LoRA on the transformer by default.

Timesteps. The methods speak DDPM-like integer-range timesteps t in [0, T-1] (T = the scheduler's
num_train_timesteps) and weight the forget term by (t/(T-1))^beta. Here t is sigma * (T-1), a float:
t = T-1 is pure noise as in DDPM, and the methods' timestep weight becomes sigma^beta, i.e. it is
expressed in sigma (docs/method.md "Rectified flow"). Timesteps are drawn as the scheduler spaces
them: u uniform, sigma = shift*u / (1 + (shift-1)*u), FlowMatchEulerDiscreteScheduler's shift.

Forward process x_t = (1 - sigma) z0 + sigma eps on latents z0 = (vae.mode - shift_factor) *
scaling_factor; the network regresses onto v = eps - z0; the surrogate target is
v_s = (x_t - z_s) / sigma (the velocity that carries x_t to the surrogate's latents in one step).

Conditioning. A run has one prompt (the targets' prompt, set in `model.sd3.prompt`): targets are
seeds (or images) of that prompt, the remember set and the integrity samples are other seeds of it
(the paper's SD3 setup, section V-B), plus a few seeds of each other prompt to preserve
(`model.sd3.extra_prompts`, `other_prompts` here), sampled under `prompting(p)`. Embeddings come from the pipeline's own `encode_prompt`, once
per prompt, cached; a batch's `cond` is a dict of embedding tensors indexed like its samples, and
`generate`/`sdedit` sample with classifier-free guidance at `model.sd3.guidance_scale`.

The hotfix is a LoRA saved the diffusers way (`pytorch_lora_weights.safetensors`), which plain
diffusers loads with `pipe.load_lora_weights(dir)`; `ray_unlearn_base.json` beside it names the base,
so ray_unlearn can load the hotfix as a model path too (base + fused LoRA).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline
from torch import nn
from tqdm.auto import tqdm

from ray_unlearn import diffusion
from ray_unlearn.config import LoraSettings, ModelConfig, SamplerConfig
from ray_unlearn.families.base import DiffusionFamily
from ray_unlearn.families.ddpm import ASSETS, ModelLoadError, weights_fingerprint

DEMO_SD3 = "demo-flags"
DEMO_SD3_DIR = ASSETS / "demo-flags32"
LORA_FILE = "pytorch_lora_weights.safetensors"
BASE_FILE = "ray_unlearn_base.json"
# The attention projections diffusers' SD3 LoRA training adapts (examples/dreambooth/
# train_dreambooth_lora_sd3.py, --lora_layers default): image and context streams.
SD3_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def resolve_sd3_path(path: str) -> str:
    if path == DEMO_SD3:
        if not (DEMO_SD3_DIR / "model_index.json").is_file():
            raise ModelLoadError(f"the SD3 flag demo model is missing from {DEMO_SD3_DIR}; retrain it with "
                                 "`python jobs/train_demo_sd3.py`")
        return str(DEMO_SD3_DIR)
    return path


def load_sd3_pipeline(path: str, revision: str | None = None, t5: bool = False) -> StableDiffusion3Pipeline:
    """A pipeline directory or hub id, or a ray_unlearn hotfix directory (LoRA + the base it names),
    whose LoRA is then fused into the base's transformer."""
    src = Path(resolve_sd3_path(path)).expanduser()
    if (src / LORA_FILE).is_file() and (src / BASE_FILE).is_file():
        base = json.loads((src / BASE_FILE).read_text())
        pipe = load_sd3_pipeline(base["path"], base.get("revision"), t5)
        pipe.load_lora_weights(str(src))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        return pipe
    extra = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    try:
        return StableDiffusion3Pipeline.from_pretrained(str(src) if src.exists() else path, revision=revision, **extra)
    except Exception as err:
        hint = ("the directory is not a StableDiffusion3Pipeline (model_index.json, transformer/, vae/, text_encoder/...)"
                if src.exists() else "no such local directory and the hub could not provide it (offline? HF_HOME?)")
        raise ModelLoadError(f"could not load an SD3 pipeline from '{path}': {hint}\n  {err}") from None


class SD3Family(DiffusionFamily):
    name = "sd3"

    def __init__(self, cfg: ModelConfig, sampler: SamplerConfig | None = None, device: str | torch.device = "cpu",
                 dtype_autocast: torch.dtype | None = None, pipe: StableDiffusion3Pipeline | None = None):
        self.cfg, self.sampler = cfg, sampler or SamplerConfig()
        self.settings = cfg.sd3
        self.device = torch.device(device)
        self.autocast_dtype = dtype_autocast
        pipe = pipe or load_sd3_pipeline(cfg.path, cfg.revision, self.settings.t5)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.device)
        for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.transformer):
            if part is not None:
                part.requires_grad_(False).eval()
        self.scheduler = pipe.scheduler
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.shift = float(self.scheduler.config.get("shift", 1.0))
        self._fingerprint = weights_fingerprint(pipe.transformer)
        lora = cfg.lora or LoraSettings(target_modules=SD3_LORA_TARGETS)
        if lora.target_modules == LoraSettings().target_modules:  # the UNet defaults mean: this family's defaults
            lora = lora.model_copy(update={"target_modules": SD3_LORA_TARGETS})
        self.lora = None if self.settings.full_finetune else lora
        if self.lora is not None:
            attach_lora(pipe.transformer, self.lora)
        else:
            pipe.transformer.requires_grad_(True)
        self.model = pipe.transformer
        self.model.train()
        t = pipe.transformer.config
        self.latent_shape = (int(t.in_channels), int(t.sample_size), int(t.sample_size))
        if self.settings.resolution is not None:
            side = self.settings.resolution // pipe.vae_scale_factor
            self.latent_shape = (int(t.in_channels), side, side)
        self.size = (self.latent_shape[1] * pipe.vae_scale_factor,) * 2
        self._emb: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._edit_prompt: str | None = None
        self._prompt_override: str | None = None

    # --- conditioning -----------------------------------------------------------------------
    @property
    def prompt(self) -> str:
        if self._prompt_override is not None:
            return self._prompt_override
        if self.settings.prompt is None:
            raise ValueError("the sd3 family needs a prompt: give each target one (--target-prompt / targets[].prompt) "
                             "or set model.sd3.prompt")
        return self.settings.prompt

    @property
    def other_prompts(self) -> list[str]:
        """The prompts preserved besides the run's (`model.sd3.extra_prompts`, the run's own left out)."""
        return [p for p in self.settings.extra_prompts if p != self.settings.prompt]

    @contextlib.contextmanager
    def prompting(self, prompt: str):
        """Within: `prompt` is the run prompt: unconditioned sampling and `fingerprint` (so the sample
        cache keys) follow it. How another prompt's remember and integrity samples are drawn."""
        previous, self._prompt_override = self._prompt_override, prompt
        try:
            yield
        finally:
            self._prompt_override = previous

    @torch.no_grad()
    def embed(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds [L,D], pooled [P]) from the pipeline's own encode_prompt, cached per prompt."""
        if prompt not in self._emb:
            pe, _, pooled, _ = self.pipe.encode_prompt(
                prompt, None, None, device=self.device, do_classifier_free_guidance=False,
                max_sequence_length=self.settings.max_sequence_length)
            self._emb[prompt] = (pe[0].float(), pooled[0].float())
        return self._emb[prompt]

    def condition(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """A batch condition: embeddings stacked in sample order (indexable like the samples)."""
        embs = [self.embed(p) for p in prompts]
        return {"prompt_embeds": torch.stack([e[0] for e in embs]), "pooled_prompt_embeds": torch.stack([e[1] for e in embs])}

    def _cond_for(self, n: int, cond, prompt: str | None = None) -> dict[str, torch.Tensor]:
        if cond is not None:
            return cond
        pe, pooled = self.embed(prompt if prompt is not None else self.prompt)
        return {"prompt_embeds": pe.expand(n, *pe.shape), "pooled_prompt_embeds": pooled.expand(n, *pooled.shape)}

    # --- data space -------------------------------------------------------------------------
    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        images = images[:, :3]
        if tuple(images.shape[-2:]) != self.size:
            images = F.interpolate(images, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return images.clamp(0, 1).to(self.device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        out = []
        for i in range(0, len(images), 16):
            x = images[i : i + 16].to(self.device, vae.dtype) * 2 - 1
            out.append(vae.encode(x).latent_dist.mode().float())
        z = torch.cat(out) if out else torch.empty(0, *self.latent_shape)
        return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        z = x.to(self.device, vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        out = [vae.decode(z[i : i + 16]).sample.float() for i in range(0, len(z), 16)]
        return ((torch.cat(out) + 1) / 2).clamp(0, 1)

    # --- rectified flow ---------------------------------------------------------------------
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return (t.to(self.device, torch.float32) / (self.num_train_timesteps - 1)).clamp(0.0, 1.0)

    def _shifted(self, u: torch.Tensor) -> torch.Tensor:
        return self.shift * u / (1 + (self.shift - 1) * u)

    def sample_timesteps(self, n: int, generator: torch.Generator, t_min: int = 0) -> torch.Tensor:
        """t = sigma*(T-1) with sigma = shift(u), u uniform on [u_min, 1]: the scheduler's spacing.
        u_min keeps sigma >= t_min/(T-1) and >= the scheduler's smallest training sigma."""
        s_min = min(max(float(t_min) / (self.num_train_timesteps - 1), 0.0), 1.0)
        u_min = max(s_min / (self.shift - (self.shift - 1) * s_min), 1.0 / self.num_train_timesteps)
        u = u_min + (1 - u_min) * torch.rand(n, generator=generator)
        return (self._shifted(u) * (self.num_train_timesteps - 1)).to(self.device)

    def noise_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.sigma(t)
        return 1 - s, s

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """The variance-preserving equivalent: x_t / sqrt((1-s)^2 + s^2) is a VP sample with
        ab = (1-s)^2 / ((1-s)^2 + s^2) (same signal-to-noise ratio)."""
        a, s = self.noise_coefficients(t)
        return a**2 / (a**2 + s**2)

    def add_noise(self, x0, eps, t):
        a, s = self.noise_coefficients(t)
        return diffusion._bcast(a, x0) * x0 + diffusion._bcast(s, x0) * eps

    def target(self, x0, eps, t):
        return eps - x0

    def surrogate_target(self, x_f, x_s, eps, t):
        return diffusion.surrogate_velocity(self.add_noise(x_f, eps, t), x_s, self.sigma(t))

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def predict(self, x_t, t, cond=None, model: nn.Module | None = None):
        cond = self._cond_for(len(x_t), cond)
        timestep = self.sigma(t) * self.num_train_timesteps  # what the scheduler feeds the transformer
        with self.autocast():
            return (model or self.model)(
                hidden_states=x_t, timestep=timestep.expand(len(x_t)),
                encoder_hidden_states=cond["prompt_embeds"].to(self.device),
                pooled_projections=cond["pooled_prompt_embeds"].to(self.device),
            ).sample.float()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # --- sampling ---------------------------------------------------------------------------
    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """diffusers' `randn_tensor` with one CPU generator per sample: the same latents
        `pipe(prompt, generator=torch.Generator().manual_seed(seed))` starts from."""
        return torch.stack([torch.randn((1, *self.latent_shape), generator=torch.Generator().manual_seed(int(s)))[0]
                            for s in seeds])

    def _embeds(self, n: int, cond, prompt: str | None, negative: str):
        c = self._cond_for(n, cond, prompt)
        npe, npooled = self.embed(negative)
        return dict(prompt_embeds=c["prompt_embeds"].to(self.device), pooled_prompt_embeds=c["pooled_prompt_embeds"].to(self.device),
                    negative_prompt_embeds=npe.expand(n, *npe.shape), negative_pooled_prompt_embeds=npooled.expand(n, *npooled.shape))

    @torch.no_grad()
    def generate(self, noise, *, model=None, progress=None, cond=None, prompt: str | None = None) -> torch.Tensor:
        """The pipeline's own Euler sampler with classifier-free guidance, from given latents."""
        if model is not None and model is not self.model:
            raise ValueError("the sd3 family samples with its own transformer (adapters on or off)")
        was_training = self.model.training
        self.model.eval()
        out, bs = [], self.sampler.batch_size
        chunks = range(0, len(noise), bs)
        for i in tqdm(chunks, desc=progress, disable=progress is None or len(chunks) == 0, leave=False):
            chunk = noise[i : i + bs].to(self.device)
            part = None if cond is None else {k: v[i : i + bs] for k, v in cond.items()}
            with self.autocast():
                lat = self.pipe(
                    **self._embeds(len(chunk), part, prompt, self.settings.negative_prompt), latents=chunk,
                    height=self.size[0], width=self.size[1], num_inference_steps=self.sampler.steps,
                    guidance_scale=self.settings.guidance_scale, output_type="latent",
                ).images
            out.append(self.decode(lat.float()).cpu())
        self.model.train(was_training)
        return torch.cat(out) if out else torch.empty(0, 3, *self.size)

    @contextlib.contextmanager
    def base_model(self):
        """The base weights for the duration (LoRA adapters disabled)."""
        if self.lora is None:
            yield
            return
        self.model.disable_adapters()
        try:
            yield
        finally:
            self.model.enable_adapters()

    @contextlib.contextmanager
    def editing(self, prompt: str | None):
        previous, self._edit_prompt = self._edit_prompt, prompt
        try:
            yield
        finally:
            self._edit_prompt = previous

    @torch.no_grad()
    def sdedit(self, images, strength, seed, model=None, cond=None, prompt: str | None = None):
        """SDEdit with the model's own SD3 img2img pipeline at `strength`, prompted with the run's
        prompt or an edit prompt (`surrogate.prompt`), from the base weights."""
        x = self.prepare_images(images)
        if strength <= 0:
            return x.cpu()
        img2img = StableDiffusion3Img2ImgPipeline(**self.pipe.components)
        img2img.set_progress_bar_config(disable=True)
        was_training = self.model.training
        self.model.eval()
        with self.base_model():
            out = img2img(
                image=x, strength=float(strength), num_inference_steps=self.sampler.steps,
                guidance_scale=self.settings.guidance_scale, output_type="pt",
                generator=[torch.Generator().manual_seed(int(seed) + i) for i in range(len(x))],
                **self._embeds(len(x), cond, prompt or self._edit_prompt, self.settings.negative_prompt),
            ).images
        self.model.train(was_training)
        return out.float().clamp(0, 1).cpu()

    # --- persistence ------------------------------------------------------------------------
    def save(self, out_dir) -> dict:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.lora is None:
            self.pipe.save_pretrained(out_dir, safe_serialization=True)
            return {"hotfix": str(out_dir), "adapter": None}
        from peft.utils import get_peft_model_state_dict

        StableDiffusion3Pipeline.save_lora_weights(
            out_dir, transformer_lora_layers=get_peft_model_state_dict(self.model), safe_serialization=True,
            transformer_lora_adapter_metadata={"r": self.lora.rank, "lora_alpha": self.lora.alpha,
                                               "target_modules": self._targets},
        )
        (out_dir / BASE_FILE).write_text(json.dumps(
            {"path": str(Path(resolve_sd3_path(self.cfg.path)).resolve()) if Path(resolve_sd3_path(self.cfg.path)).exists()
             else self.cfg.path, "revision": self.cfg.revision, "prompt": self.settings.prompt,
             "guidance_scale": self.settings.guidance_scale}, indent=2) + "\n")
        out = {"hotfix": str(out_dir), "adapter": str(out_dir)}
        if self.settings.save_fused:
            fused = out_dir / "fused"
            load_sd3_pipeline(str(out_dir), t5=self.settings.t5).save_pretrained(fused, safe_serialization=True)
            out["fused"] = str(fused)
        return out

    @property
    def _targets(self) -> list[str]:
        return sorted(self.model.peft_config["default"].target_modules)

    def fingerprint(self) -> str:
        """Base weights + what a cached sample also depends on here: prompt and guidance."""
        from ray_unlearn.hashing import content_hash

        s = self.settings
        prompt = s.prompt if self._prompt_override is None else self._prompt_override
        return content_hash(self._fingerprint, prompt, s.negative_prompt, s.guidance_scale, s.max_sequence_length,
                            list(self.latent_shape))[:16]

    def describe(self) -> dict:
        return {
            "family": self.name, "path": self.cfg.path, "resolved": resolve_sd3_path(self.cfg.path),
            "fingerprint": self._fingerprint, "prompt": self.settings.prompt,
            "guidance_scale": self.settings.guidance_scale, "other_prompts": self.other_prompts,
            "params": sum(p.numel() for p in self.model.parameters()),
            "trainable": sum(p.numel() for p in self.trainable_parameters()),
            "lora": self.lora.model_dump() if self.lora else None,
        }


def attach_lora(transformer, lora: LoraSettings) -> None:
    """peft LoRA through diffusers' own `add_adapter` (as its SD3 LoRA training script does);
    Gaussian A, zero B: the adapter starts as the identity. Only adapter weights train."""
    from peft import LoraConfig

    names = [n for n, _ in transformer.named_modules()]
    present = [m for m in lora.target_modules if any(n == m or n.endswith("." + m) for n in names)]
    if not present:
        raise ModelLoadError(f"none of the LoRA target modules {lora.target_modules} exist in this SD3 transformer; "
                             f"use names such as {', '.join(SD3_LORA_TARGETS)}")
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                       init_lora_weights="gaussian", target_modules=present))
