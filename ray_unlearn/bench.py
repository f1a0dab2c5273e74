"""Side-by-side timings on the demo model, measured in one process, interleaved (A B A B ...) so
load on the machine hits every variant alike. Ratios, not absolute times, are the figures.

- surgery step / plain step: the paper's step (forget and remember gradients in two passes,
  projection, optimizer) against one ordinary fine-tuning step over the same 4+4 samples.
- shared-forward step / plain step: the same two gradients from one forward with retain_graph
  (the alternative the two-pass design was chosen over).
- sampling images/s (DDIM, the configured steps); on CUDA also bf16 vs fp32.
"""

from __future__ import annotations

import platform
import statistics
import time

import torch

from ray_unlearn import diffusion
from ray_unlearn.config import UnlearnConfig
from ray_unlearn.engine import load_family
from ray_unlearn.loop import UnlearnData, UnlearnLoop
from ray_unlearn.methods import build_method
from ray_unlearn.methods.base import grads_of


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _plain_step(loop: UnlearnLoop):
    """One ordinary fine-tuning step: standard loss over forget+remember samples in one batch."""
    fam, method = loop.family, loop.method

    def step():
        b = loop.batch()
        x0 = torch.cat([b["forget"]["x0"], b["remember"]["x0"]])
        loss, _ = method.standard_loss(x0, loop.gen)
        loss.mean().backward()
        loop.optimizer.step()
        loop.optimizer.zero_grad(set_to_none=True)

    return step


def _shared_forward_step(loop: UnlearnLoop):
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


def _make_loop(cfg: UnlearnConfig, precision: str) -> UnlearnLoop:
    cfg = cfg.model_copy(deep=True)
    cfg.train.precision = precision
    fam = load_family(cfg)
    g = torch.Generator().manual_seed(0)
    shape = (fam.channels, *fam.size)
    forget = torch.rand(4, *shape, generator=g) * 2 - 1
    data = UnlearnData(forget, forget.flip(-1), torch.rand(32, *shape, generator=g) * 2 - 1)
    return UnlearnLoop(fam, build_method(cfg.method, fam), data, cfg.train)


def step_ratios(cfg: UnlearnConfig, steps: int, precision: str = "fp32") -> dict:
    loop = _make_loop(cfg, precision)
    dev = loop.family.device
    variants = {"plain": _plain_step(loop), "surgery": loop.step, "shared_forward": _shared_forward_step(loop)}
    for fn in variants.values():  # warm-up (allocator, kernels, autotune)
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(steps):
        for name, fn in variants.items():
            times[name].append(_time(fn, dev))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "plain_step_s": round(med["plain"], 4),
        "surgery_step_s": round(med["surgery"], 4),
        "shared_forward_step_s": round(med["shared_forward"], 4),
        "surgery_over_plain": round(med["surgery"] / med["plain"], 3),
        "shared_forward_over_plain": round(med["shared_forward"] / med["plain"], 3),
    }


def sampling_rate(cfg: UnlearnConfig, n: int, precision: str = "fp32") -> float:
    cfg = cfg.model_copy(deep=True)
    cfg.train.precision = precision
    fam = load_family(cfg)
    noise = fam.initial_noise(list(range(n)))
    fam.generate(noise[:2])  # warm-up
    dt = _time(lambda: fam.generate(noise), fam.device)
    return round(n / dt, 2)


def run_benchmark(steps: int = 10, n_samples: int = 16, progress: bool = True, cfg: UnlearnConfig | None = None) -> dict:
    cfg = cfg or UnlearnConfig()
    fam_device = load_family(cfg).device
    res: dict = {
        "device": torch.cuda.get_device_name() if fam_device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": cfg.model.path,
        "batch": f"{cfg.train.batch_forget} forget + {cfg.train.batch_remember} remember",
        "timed_steps_per_variant": steps,
    }
    res.update(step_ratios(cfg, steps, "fp32"))
    res["sampling_images_per_s"] = sampling_rate(cfg, n_samples, "fp32")
    res["sampling_steps"] = cfg.sampler.steps
    if fam_device.type == "cuda" and torch.cuda.is_bf16_supported():
        bf = step_ratios(cfg, steps, "bf16")
        res["bf16_surgery_over_plain"] = bf["surgery_over_plain"]
        res["bf16_step_speedup"] = round(res["surgery_step_s"] / bf["surgery_step_s"], 3)
        bf_rate = sampling_rate(cfg, n_samples, "bf16")
        res["bf16_sampling_images_per_s"] = bf_rate
        res["bf16_sampling_speedup"] = round(bf_rate / res["sampling_images_per_s"], 3)
    res["target_surgery_over_plain"] = 1.15
    res["meets_target"] = res["surgery_over_plain"] <= 1.15
    return res
