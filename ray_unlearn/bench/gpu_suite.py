"""The prepared GPU suite: `python jobs/benchmark.py --suite gpu` (one H100/H200, <= 7 min, nothing
downloaded). `--tiny` runs the same code on a tiny UNet on CPU in seconds (the tests run it).

The model is the google/ddpm-celebahq-256 architecture (UNet2DModel, 113.7M parameters) built from
its config, written below, with seeded random weights: timings do not depend on weight values.
Figures, each measured in this run (an extrapolation says so in its name):
- surgery step / plain fine-tuning step at 256 px, batch 8 forget + 8 remember, fp32 (TF32 on) and
  bf16 autocast, with MFU;
- sampling images/s at the best batch size, bf16 + channels_last + torch.compile, against diffusers'
  default DDPMPipeline in fp32 on the same weights, both per network evaluation (same steps) and
  end to end (each with its default steps), with MFU of each;
- wall time of a 240-step hotfix (the paper's) run in full, and of a 1,000-sample verification
  (DDIM 50, the reference; and the fast solver) run in full;
- peak GPU memory.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from ray_unlearn.bench.flops import Peaks, count_flops, sig, sync
from ray_unlearn.bench.loop_bench import device_name, log_sync_ratio, make_loop, step_figures, timed
from ray_unlearn.config import ModelConfig, SamplerConfig, TrainConfig, UnlearnConfig
from ray_unlearn.families.ddpm import DDPMFamily

# google/ddpm-celebahq-256 unet/config.json (Ho et al. 2020's CelebA-HQ 256 model, ported to diffusers)
CELEBAHQ_256_UNET = dict(
    sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    act_fn="silu", attention_head_dim=None, center_input_sample=False, downsample_padding=0,
    flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1, norm_eps=1e-6, norm_num_groups=32,
    time_embedding_type="positional",
)
# its scheduler_config.json: linear betas 1e-4..0.02 over 1,000 steps
CELEBAHQ_256_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                              clip_sample=True, variance_type="fixed_small")
TINY_UNET = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=4, attention_head_dim=8)

# (GPU, tiny): what the suite runs
SETTINGS = {
    False: dict(step_reps=5, hotfix_steps=240, batch_sizes=(32, 64, 128, 256), sample_steps_timed=5,
                verify_n=1000, baseline_steps_timed=5, fast_steps=20, log_sync_steps=10),
    True: dict(step_reps=1, hotfix_steps=2, batch_sizes=(2, 4), sample_steps_timed=2,
               verify_n=2, baseline_steps_timed=2, fast_steps=3, log_sync_steps=2),
}
REFERENCE_STEPS = 50  # DDIM 50 eta 1, the reference verifier (SamplerConfig)
DDPM_PIPELINE_DEFAULT_STEPS = 1000  # DDPMPipeline.__call__(num_inference_steps=1000)


def build_unet(tiny: bool, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**(TINY_UNET if tiny else CELEBAHQ_256_UNET))


def build_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**CELEBAHQ_256_SCHEDULER)


def _family(unet: UNet2DModel, device: torch.device, precision: str, sampler: SamplerConfig) -> DDPMFamily:
    return DDPMFamily(ModelConfig(path="celebahq-256-architecture"), sampler, device,
                      torch.bfloat16 if precision == "bf16" else None, unet=unet, scheduler=build_scheduler())


def _mem_gb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def _reset_mem(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _sampling_step_rate(fam: DDPMFamily, batch: int, timed_steps: int, peaks: Peaks, precision: str) -> dict:
    """Seconds per denoising step at `batch` (model + scheduler, `timed_steps` steps after a warm-up
    step) and images/s of a full DDIM 50 verification derived from it (stated: per-step rate x 50)."""
    solver = fam._solver()
    noise = fam.initial_noise(list(range(batch))).to(fam.device)
    net = fam.sampling_model()
    ts = solver.timesteps[: timed_steps + 1]
    gens = fam._noise_generators(list(range(batch)))
    fam.model.eval()
    fam._denoise(noise, ts[:1], fam._solver(), fam.model, gens)  # warm-up (compiles at this shape)
    seconds = timed(lambda: fam._denoise(noise, ts[1:], solver, fam.model, gens), fam.device) / timed_steps
    flops = count_flops(lambda: fam.predict(noise, ts[:1].expand(batch), model=fam.model)) if net is not None else 0
    return {"batch": batch, "step_s": round(seconds, 5),
            "images_per_s_ddim50": round(batch / (seconds * REFERENCE_STEPS), 3),
            **peaks.figure(flops, seconds, precision)}


def _pipeline_rate(unet: UNet2DModel, batch: int, timed_steps: int, peaks: Peaks, device: torch.device) -> dict:
    """diffusers' default DDPMPipeline, fp32, on the same weights: seconds per step at `batch`
    (`timed_steps` steps of its own loop), images/s at its default 1,000 steps and per step."""
    pipe = DDPMPipeline(unet=unet, scheduler=build_scheduler()).to(device)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator(device="cpu").manual_seed(0)
    pipe(batch_size=batch, num_inference_steps=1, generator=gen, output_type="np")  # warm-up
    seconds = timed(lambda: pipe(batch_size=batch, num_inference_steps=timed_steps, generator=gen,
                                 output_type="np"), device) / timed_steps
    x = torch.randn(batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size, device=device)
    with torch.no_grad():
        flops = count_flops(lambda: unet(x, torch.full((batch,), 10, device=device)))
    return {"batch": batch, "step_s": round(seconds, 5),
            "images_per_s_default_1000_steps": round(batch / (seconds * DDPM_PIPELINE_DEFAULT_STEPS), 4),
            "images_per_s_at_50_steps": round(batch / (seconds * REFERENCE_STEPS), 3),
            **peaks.figure(flops, seconds, "fp32")}


def run_gpu_suite(tiny: bool = False, out: str | Path = "gpu_suite.json", compile: bool | None = None,
                  progress: bool = True) -> dict:
    t_start = time.perf_counter()
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    if not tiny and device.type != "cuda":
        raise RuntimeError("--suite gpu needs a CUDA device (none is visible); `--suite gpu --tiny` runs the same "
                           "code on CPU")
    s = SETTINGS[tiny]
    compile = (device.type == "cuda") if compile is None else compile
    say = print if progress else (lambda *a, **k: None)
    threads = torch.get_num_threads()
    if tiny:  # one thread: a tiny model's ops are too small to split, and a busy machine's spinning
        torch.set_num_threads(1)  # OpenMP threads made them 40x slower here (docs/benchmarks.md)
    try:
        return _run(tiny, device, s, compile, say, out, progress, t_start)
    finally:
        torch.set_num_threads(threads)


def _run(tiny, device, s, compile, say, out, progress, t_start) -> dict:
    if device.type == "cuda":  # TF32 for fp32 matmuls and convolutions (the fp32 path's figures say so)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    peaks = Peaks(device)
    unet = build_unet(tiny)
    res: dict = {
        "device": device_name(device), "tiny": tiny, "torch": torch.__version__,
        "architecture": "tiny test UNet" if tiny else "google/ddpm-celebahq-256 (random weights)",
        "params_m": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "peaks_measured_tflops": {p: sig(peaks.measured(p) / 1e12) for p in ("fp32", "bf16")},
    }
    phases: dict[str, float] = {}

    # 1. surgery / plain step, fp32 and bf16, batch 8 + 8
    cfg = UnlearnConfig(train=TrainConfig(batch_forget=8, batch_remember=8, steps=s["hotfix_steps"], device=str(device)))
    for precision in ("fp32", "bf16"):
        t0 = time.perf_counter()
        _reset_mem(device)
        say(f"[suite] training steps, {precision} ...")
        fam = _family(copy.deepcopy(unet), device, precision, SamplerConfig())
        c = cfg.model_copy(deep=True)
        c.train.precision = precision
        res[f"train_{precision}"] = {**step_figures(make_loop(fam, c, n_forget=8, n_remember=64), s["step_reps"],
                                                    peaks, precision), "peak_memory_gb": _mem_gb(device)}
        phases[f"train_{precision}"] = time.perf_counter() - t0
    res["surgery_over_plain_fp32"] = res["train_fp32"]["surgery_over_plain"]
    res["surgery_over_plain_bf16"] = res["train_bf16"]["surgery_over_plain"]

    # 2. a whole hotfix: the paper's 240 steps, bf16 (measured, not extrapolated)
    t0 = time.perf_counter()
    say(f"[suite] hotfix, {s['hotfix_steps']} steps, bf16 ...")
    c = cfg.model_copy(deep=True)
    c.train.precision = "bf16"
    loop = make_loop(_family(copy.deepcopy(unet), device, "bf16", SamplerConfig()), c, n_forget=8, n_remember=64)
    sync(device)
    t_h = time.perf_counter()
    loop.run(progress=progress)
    sync(device)
    res["hotfix_steps"] = s["hotfix_steps"]
    res["hotfix_wall_s"] = round(time.perf_counter() - t_h, 2)
    # logging: .item() per term per step against one transfer per report
    res["log_sync_bf16"] = log_sync_ratio(loop, s["log_sync_steps"])
    del loop
    phases["hotfix"] = time.perf_counter() - t0

    # 3. sampling: bf16 + channels_last (+ compiled) per batch size; the best one
    t0 = time.perf_counter()
    _reset_mem(device)
    fast_unet = copy.deepcopy(unet).to(device)
    if device.type == "cuda":
        fast_unet = fast_unet.to(memory_format=torch.channels_last)
    sampler = SamplerConfig(kind="ddim", steps=REFERENCE_STEPS, compile=compile)
    fam = _family(fast_unet, device, "bf16", sampler)
    scan = []
    for bs in s["batch_sizes"]:
        say(f"[suite] sampling, bf16{' + compiled' if compile else ''}, batch {bs} ...")
        try:
            scan.append(_sampling_step_rate(fam, bs, s["sample_steps_timed"], peaks, "bf16"))
        except Exception as err:  # a failed compilation must not cost the lent machine's run
            if not compile:
                raise
            res["compile_error"] = repr(err)[:1000]
            say(f"[suite] torch.compile failed ({type(err).__name__}); going on without it")
            compile, sampler = False, sampler.model_copy(update={"compile": False})
            fam = _family(fast_unet, device, "bf16", sampler)
            scan.append(_sampling_step_rate(fam, bs, s["sample_steps_timed"], peaks, "bf16"))
    res["compiled"] = compile
    best = max(scan, key=lambda r: r["images_per_s_ddim50"])
    res["sampling_scan"] = scan
    res["sampling_best"] = best
    phases["sampling_scan"] = time.perf_counter() - t0

    # 4. diffusers' default DDPMPipeline, fp32 (torch's default TF32 settings), same weights, same batch
    t0 = time.perf_counter()
    say("[suite] diffusers DDPMPipeline fp32 ...")
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True  # torch's defaults
    base = _pipeline_rate(copy.deepcopy(unet), best["batch"], s["baseline_steps_timed"], peaks, device)
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    res["ddpm_pipeline_fp32"] = base
    res["sampling_speedup_per_evaluation"] = round(base["step_s"] / best["step_s"] * best["batch"] / base["batch"], 3)
    res["sampling_speedup_end_to_end_ddim50_vs_pipeline_default"] = round(
        best["images_per_s_ddim50"] / base["images_per_s_default_1000_steps"], 2)
    phases["pipeline_baseline"] = time.perf_counter() - t0

    # 5. a 1,000-sample verification in full: the reference DDIM 50 and the fast solver
    for name, smp in (("ddim50", sampler),
                      (f"dpmsolver++{s['fast_steps']}", SamplerConfig(kind="dpmsolver++", steps=s["fast_steps"],
                                                                      compile=compile))):
        t0 = time.perf_counter()
        say(f"[suite] verification, {s['verify_n']} samples, {name} ...")
        vfam = _family(fast_unet, device, "bf16", smp.model_copy(update={"batch_size": best["batch"]}))
        vfam._compiled = fam.__dict__.get("_compiled", {})  # the same compiled UNet
        noise = vfam.initial_noise(list(range(s["verify_n"])))
        seconds = timed(lambda: vfam.generate(noise), device)
        res[f"verification_{name}_n"] = s["verify_n"]
        res[f"verification_{name}_wall_s"] = round(seconds, 2)
        phases[f"verification_{name}"] = time.perf_counter() - t0
    res["peak_memory_gb"] = _mem_gb(device)
    res["phase_seconds"] = {k: round(v, 1) for k, v in phases.items()}
    res["suite_wall_s"] = round(time.perf_counter() - t_start, 1)
    res["targets"] = {"surgery_over_plain": 1.15, "sampling_speedup": 2.0, "sampling_mfu": 0.40,
                      "hotfix_240_s": 20, "verification_1000_s": 60}
    Path(out).write_text(json.dumps(res, indent=2) + "\n")
    return res


def table(res: dict) -> list[tuple[str, str]]:
    """The printed table's rows (figure, value)."""
    def mfu(fig: dict) -> str:
        return f"{fig['achieved_tflops']:.3g} TFLOP/s, MFU {fig['mfu']:.1%}"

    rows = [("device", res["device"]), ("architecture", f"{res['architecture']}, {res['params_m']}M params")]
    for p in ("fp32", "bf16"):
        t = res[f"train_{p}"]
        rows.append((f"surgery / plain step ({p})", f"{t['surgery_over_plain']}  (surgery {t['surgery_step_s']} s, "
                                                    f"{mfu(t['surgery_step'])}; plain {mfu(t['plain_step'])})"))
    rows.append((f"hotfix {res['hotfix_steps']} steps bf16", f"{res['hotfix_wall_s']} s (measured)"))
    b, p = res["sampling_best"], res["ddpm_pipeline_fp32"]
    rows.append(("sampling bf16+compiled, best", f"batch {b['batch']}: {b['images_per_s_ddim50']} img/s at DDIM 50, {mfu(b)}"))
    rows.append(("DDPMPipeline fp32 default", f"batch {p['batch']}: {p['images_per_s_at_50_steps']} img/s at 50 steps "
                                              f"({p['images_per_s_default_1000_steps']} at its 1000), {mfu(p)}"))
    rows.append(("speedup per network evaluation", f"{res['sampling_speedup_per_evaluation']}x"))
    rows.append((".item() per term / once per report", f"{res['log_sync_bf16']['per_term_over_once']}"))
    for k in [k for k in res if k.startswith("verification_") and k.endswith("_wall_s")]:
        rows.append((k.removesuffix("_wall_s").replace("_", " ") + f" x{res[k.removesuffix('_wall_s') + '_n']}",
                     f"{res[k]} s (measured)"))
    rows.append(("peak GPU memory", f"{res['peak_memory_gb']} GB" if res["peak_memory_gb"] is not None else "n/a (CPU)"))
    rows.append(("suite wall time", f"{res['suite_wall_s']} s"))
    return rows
