"""Side-by-side timings on one model, measured in one process, interleaved (A B A B ...) so load
on the machine hits every variant alike. Ratios and MFU, not absolute times, are the figures.

- surgery step / plain step: the paper's step (forget and remember gradients in two passes,
  projection, optimizer) against one ordinary fine-tuning step over the same samples.
- shared-forward step / plain step: the same two gradients from one forward with retain_graph
  (the alternative the two-pass design was chosen over).
- every GPU-path choice as a ratio against plain fp32 in the same run: bf16 autocast (steps and
  sampling), channels_last and torch.compile (sampling), logging from tensors gathered once per
  report against `.item()` per term per step.
- sampling images/s with the configured sampler, and the network evaluations per image of the
  reference DDIM 50 against the fast solver.
Every time comes with its FLOPs (torch's FLOP counter on the same call) and MFU (flops.py).
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch

from ray_unlearn import diffusion
from ray_unlearn.bench.flops import Peaks, count_flops, sync
from ray_unlearn.config import SamplerConfig, TrainConfig, UnlearnConfig
from ray_unlearn.engine import load_family
from ray_unlearn.families.ddpm import DDPMFamily
from ray_unlearn.loop import UnlearnData, UnlearnLoop, materialize
from ray_unlearn.methods import build_method
from ray_unlearn.methods.base import grads_of


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(variants: dict[str, Callable[[], object]], device: torch.device, reps: int) -> dict[str, float]:
    """Median seconds per call of each variant, timed A B A B ... after one warm-up call each."""
    for fn in variants.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(reps):
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    return {k: statistics.median(v) for k, v in times.items()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


# --- training steps ------------------------------------------------------------------------------
def plain_step(loop: UnlearnLoop) -> Callable[[], None]:
    """One ordinary fine-tuning step: standard loss over forget+remember samples in one batch."""

    def step():
        b = loop.batch()
        x0 = torch.cat([b["forget"]["x0"], b["remember"]["x0"]])
        loss, _ = loop.method.standard_loss(x0, loop.gen)
        loss.mean().backward()
        loop.optimizer.step()
        loop.optimizer.zero_grad(set_to_none=True)

    return step


def shared_forward_step(loop: UnlearnLoop) -> Callable[[], None]:
    """Both gradients from ONE forward over forget+remember and two backward passes."""
    fam, method = loop.family, loop.method

    def step():
        b = loop.batch()
        nf = len(b["forget"]["x0"])
        x_f, x_s, x_r = b["forget"]["x0"], b["forget"]["x_s"], b["remember"]["x0"]
        x0 = torch.cat([x_f, x_r])
        t = fam.sample_timesteps(len(x0), loop.gen)
        eps = torch.randn(x0.shape, generator=loop.gen).to(x0.device)
        pred = fam.predict(fam.add_noise(x0, eps, t), t)
        w = method._weight(t)
        tgt_f = fam.surrogate_target(x_f, x_s, eps[:nf], t[:nf])
        loss_f = (w[:nf] * diffusion.per_sample_mse(pred[:nf], tgt_f)).mean()
        loss_r = ((1 - w[nf:]) * diffusion.per_sample_mse(pred[nf:], eps[nf:])).mean()
        g_f = grads_of(loss_f, loop.params, retain_graph=True)
        g_r = grads_of(loss_r, loop.params)
        grads, _ = method.combine(g_f, g_r)
        for p, g in zip(loop.params, grads):
            p.grad = g
        loop.optimizer.step()
        loop.optimizer.zero_grad(set_to_none=True)

    return step


def make_loop(family: DDPMFamily, cfg: UnlearnConfig, n_forget: int = 4, n_remember: int = 32) -> UnlearnLoop:
    """A loop on random data in the family's space (timings do not depend on image content)."""
    g = torch.Generator().manual_seed(0)
    shape = (family.channels, *family.size)
    forget = torch.rand(n_forget, *shape, generator=g) * 2 - 1
    data = UnlearnData(forget, forget.flip(-1), torch.rand(n_remember, *shape, generator=g) * 2 - 1)
    return UnlearnLoop(family, build_method(cfg.method, family), data, cfg.train)


def step_figures(loop: UnlearnLoop, reps: int, peaks: Peaks, precision: str) -> dict:
    """Surgery vs plain vs shared-forward step: times, ratios, FLOPs and MFU of each."""
    dev = loop.family.device
    variants = {"plain": plain_step(loop), "surgery": loop.step, "shared_forward": shared_forward_step(loop)}
    med = interleaved(variants, dev, reps)
    out: dict = {}
    for name, fn in variants.items():
        flops = count_flops(fn)
        out[f"{name}_step_s"] = round(med[name], 4)
        out[f"{name}_step"] = peaks.figure(flops, med[name], precision)
    out["surgery_over_plain"] = round(med["surgery"] / med["plain"], 3)
    out["shared_forward_over_plain"] = round(med["shared_forward"] / med["plain"], 3)
    return out


def log_sync_ratio(loop: UnlearnLoop, steps: int) -> dict:
    """`.item()` per logged term per step against one transfer per report (`materialize` once
    over `steps` steps): seconds of `steps` steps each way, interleaved."""

    def per_term():
        for _ in range(steps):
            logs = loop.step()
            {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in logs.items()}

    def once_per_report():
        pending = [loop.step() for _ in range(steps)]
        for logs in pending:  # what a report of the whole window would carry, one transfer each
            materialize(logs)

    med = interleaved({"per_term": per_term, "once": once_per_report}, loop.family.device, 2)
    return {"item_per_term_s": round(med["per_term"], 4), "once_per_report_s": round(med["once"], 4),
            "per_term_over_once": round(med["per_term"] / med["once"], 3)}


# --- sampling ------------------------------------------------------------------------------------
def with_sampler(family: DDPMFamily, **update) -> DDPMFamily:
    """The same weights (shared module), another sampler configuration."""
    fam = copy.copy(family)
    fam.sampler = family.sampler.model_copy(update=update)
    fam.__dict__.pop("_compiled", None)
    return fam


def sampling_figure(family: DDPMFamily, noise: torch.Tensor, peaks: Peaks, precision: str, reps: int = 1) -> dict:
    """Images/s of `family.generate` on `noise` (median of `reps` after a warm-up batch) with the
    FLOPs of the whole generation counted on the same call."""
    dev = family.device
    family.generate(noise[: min(len(noise), family.sampler.batch_size)])  # warm-up (and compile)
    seconds = statistics.median(timed(lambda: family.generate(noise), dev) for _ in range(reps))
    flops = count_flops(lambda: family.generate(noise))
    return {"images_per_s": round(len(noise) / seconds, 3), "seconds": round(seconds, 3),
            "evaluations_per_image": family.evaluations_per_image(), **peaks.figure(flops, seconds, precision)}


def set_precision(family: DDPMFamily, precision: str) -> DDPMFamily:
    fam = copy.copy(family)
    fam.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
    fam.__dict__.pop("_compiled", None)
    return fam


def channels_last_family(family: DDPMFamily) -> DDPMFamily:
    """The family on a channels_last copy of its UNet (the original stays as it is)."""
    fam = copy.copy(family)
    fam.model = copy.deepcopy(family.model).to(memory_format=torch.channels_last)
    fam.__dict__.pop("_compiled", None)
    return fam


# --- the loop benchmark (`python jobs/benchmark.py`) -------------------------------------------
def run_benchmark(steps: int = 10, n_samples: int = 16, progress: bool = True, cfg: UnlearnConfig | None = None,
                  compile: bool = False, fast_steps: int = 20) -> dict:
    cfg = cfg or UnlearnConfig()
    base = load_family(cfg)
    dev = base.device
    peaks = Peaks(dev)
    res: dict = {
        "device": device_name(dev),
        "model": cfg.model.path,
        "batch": f"{cfg.train.batch_forget} forget + {cfg.train.batch_remember} remember",
        "timed_steps_per_variant": steps,
    }

    def family(precision: str) -> DDPMFamily:
        c = cfg.model_copy(deep=True)
        c.train.precision = precision
        return load_family(c)

    res.update(step_figures(make_loop(family("fp32"), cfg), steps, peaks, "fp32"))
    bf = step_figures(make_loop(family("bf16"), cfg), steps, peaks, "bf16")
    res["bf16_surgery_over_plain"] = bf["surgery_over_plain"]
    res["bf16_surgery_step"] = bf["surgery_step"]
    res["bf16_over_fp32_step_speedup"] = round(res["surgery_step_s"] / bf["surgery_step_s"], 3)
    res["log_sync"] = log_sync_ratio(make_loop(family("fp32"), cfg), max(2, steps))

    # sampling: the configured sampler in fp32, then each GPU-path choice against it
    fam = family("fp32")
    noise = fam.initial_noise(list(range(n_samples)))
    ref = sampling_figure(fam, noise, peaks, "fp32")
    res["sampling_images_per_s"] = ref["images_per_s"]
    res["sampling"] = ref
    res["sampling_sampler"] = f"{fam.sampler.kind} {fam.sampler.steps} steps"
    bf_s = sampling_figure(set_precision(fam, "bf16"), noise, peaks, "bf16")
    res["sampling_bf16"] = bf_s
    res["sampling_bf16_over_fp32"] = round(bf_s["images_per_s"] / ref["images_per_s"], 3)
    cl = sampling_figure(channels_last_family(fam), noise, peaks, "fp32")
    res["sampling_channels_last_over_fp32"] = round(cl["images_per_s"] / ref["images_per_s"], 3)
    if compile:
        comp = sampling_figure(with_sampler(fam, compile=True), noise, peaks, "fp32")
        res["sampling_compiled_over_fp32"] = round(comp["images_per_s"] / ref["images_per_s"], 3)
    fast = with_sampler(fam, kind="dpmsolver++", steps=fast_steps)
    fast_fig = sampling_figure(fast, noise, peaks, "fp32")
    res["fast_sampler"] = f"dpmsolver++ {fast_steps} steps"
    res["fast_sampler_evaluations_cut"] = round(ref["evaluations_per_image"] / fast_fig["evaluations_per_image"], 3)
    res["fast_sampler_images_per_s_ratio"] = round(fast_fig["images_per_s"] / ref["images_per_s"], 3)
    res["target_surgery_over_plain"] = 1.15
    res["meets_target"] = res["surgery_over_plain"] <= 1.15
    return res
