"""Benchmarks: the loop (`run_benchmark`), the prepared GPU suite (`run_gpu_suite`), the sampler
agreement study (`run_sampler_agreement`) and verification scaling over Ray workers
(`run_scaling`). Each prints ratios and MFU measured side by side in one run."""

from ray_unlearn.bench.loop_bench import run_benchmark

__all__ = ["run_benchmark"]
