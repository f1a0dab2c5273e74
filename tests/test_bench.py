"""Benchmarks run end to end on tiny models built in code: the prepared GPU suite's --tiny mode
(the same code as on a GPU), the loop benchmark's figures, the FLOP counting behind MFU. No
timing is asserted: only that every figure is there, consistent and computed from the run."""

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_scheduler, tiny_unet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "jobs"))

from ray_unlearn.bench.flops import Peaks, count_flops  # noqa: E402
from ray_unlearn.bench.gpu_suite import CELEBAHQ_256_UNET  # noqa: E402


def test_flop_counter_counts_a_matmul_and_mfu_is_its_ratio():
    a, b = torch.randn(64, 32), torch.randn(32, 16)
    assert count_flops(lambda: a @ b) == 2 * 64 * 32 * 16
    fig = Peaks(torch.device("cpu")).figure(1e9, 0.5, "fp32")
    assert fig["achieved_tflops"] == pytest.approx(0.002)
    assert fig["mfu"] == pytest.approx(2e9 / (fig["peak_measured_tflops"] * 1e12), rel=1e-2)
    assert fig["peak_measured_tflops"] > 0 and "peak_spec_tflops" not in fig  # CPU: no data sheet


def test_celebahq_architecture_matches_the_published_model():
    """113.7M parameters and ~497 GFLOP per forward at batch 1 (counted on the meta device)."""
    from diffusers import UNet2DModel

    with torch.device("meta"):
        unet = UNet2DModel(**CELEBAHQ_256_UNET)
        x, t = torch.empty(1, 3, 256, 256), torch.tensor([10])
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 113.7
    assert 490e9 < count_flops(lambda: unet(x, t)) < 505e9


@pytest.mark.slow  # 10 s to minutes on 2 CPU cores, depending on what else runs
def test_gpu_suite_tiny_runs_the_same_code_on_cpu(tmp_path, capsys):
    import benchmark

    out = tmp_path / "gpu_suite.json"
    res = benchmark.main(["--suite", "gpu", "--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    for p in ("fp32", "bf16"):
        t = res[f"train_{p}"]
        assert t["surgery_over_plain"] == pytest.approx(t["surgery_step_s"] / t["plain_step_s"], rel=0.01)
        # the surgery step does the plain step's work in two passes: about the same FLOPs
        assert t["surgery_step"]["gflop"] == pytest.approx(t["plain_step"]["gflop"], rel=0.25)
        assert 0 < t["surgery_step"]["mfu"] < 1
    assert res["hotfix_steps"] == 2 and res["hotfix_wall_s"] > 0
    assert res["sampling_best"] in res["sampling_scan"] and [r["batch"] for r in res["sampling_scan"]] == [2, 4]
    assert res["sampling_best"]["images_per_s_ddim50"] == max(r["images_per_s_ddim50"] for r in res["sampling_scan"])
    assert res["ddpm_pipeline_fp32"]["batch"] == res["sampling_best"]["batch"]
    assert res["verification_ddim50_n"] == 2 and res["verification_dpmsolver++3_wall_s"] > 0
    assert res["peak_memory_gb"] is None  # CPU
    assert res["log_sync_bf16"]["per_term_over_once"] > 0
    printed = capsys.readouterr().out
    assert "surgery / plain step (bf16)" in printed and "DDPMPipeline fp32 default" in printed


@pytest.mark.slow
def test_loop_benchmark_figures(tiny_model_dir, tmp_path):
    from ray_unlearn.bench import run_benchmark
    from ray_unlearn.config import load_config

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "sampler.steps=6", "sampler.batch_size=2",
                             f"cache_dir={tmp_path}", "train.device=cpu"])
    res = run_benchmark(steps=1, n_samples=2, cfg=cfg, fast_steps=2)
    assert res["surgery_over_plain"] == pytest.approx(res["surgery_step_s"] / res["plain_step_s"], rel=0.01)
    for k in ("plain_step", "surgery_step", "shared_forward_step", "bf16_surgery_step", "sampling", "sampling_bf16"):
        assert res[k]["gflop"] > 0 and res[k]["mfu"] > 0, k
    assert res["sampling"]["evaluations_per_image"] == 6 and res["fast_sampler_evaluations_cut"] == 3.0
    # sampling FLOPs = evaluations x images x one forward: the fast solver's are a third
    assert res["log_sync"]["per_term_over_once"] > 0 and "sampling_channels_last_over_fp32" in res


def test_benchmark_cli_is_extensible():
    import benchmark

    a = benchmark.parser().parse_args(["--sampler-agreement", "--fast-steps", "15"])
    assert a.sampler_agreement and a.fast_steps == 15 and a.suite is None
