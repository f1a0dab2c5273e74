"""Model FLOP utilisation: FLOPs counted by torch's FLOP counter on the real step, over the time
the step took, over the device's peak in the same dtype.

The peak is measured in the same run (a large matmul in the step's dtype, best of a few) on every
device; on CUDA the spec sheet's dense peak is given next to it, and MFU is quoted against both.
FlopCounterMode counts matmuls, convolutions and attention (the work the peak measures); the
elementwise ops it leaves out are memory-bound and would not reach the matmul peak anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) peaks in TFLOP/s from NVIDIA's data sheets (H100/H200 SXM: "BF16 Tensor Core
# 1,979 TFLOPS with sparsity", i.e. 989 dense; TF32 989 sparse -> 494 dense; FP32 67. A100 SXM:
# 312 / 156 / 19.5; H100 PCIe: 756 / 378 / 51). More specific names first.
SPEC_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H200", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H100", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (forward and backward alike), as torch's FLOP counter counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tf32_enabled() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


def measured_peak(device: torch.device, precision: str, n: int | None = None, reps: int = 5) -> float:
    """FLOP/s of an n x n matmul in the precision's dtype on `device` (best of `reps`).

    On a CPU, bf16 kernels without native bf16 units widen to fp32 and do the math there, and their
    bf16 matmul can be slower than the convolutions the step runs (a CI run measured a bf16 step at
    2.3x such a "peak"): the CPU's bf16 peak is the better of its bf16 and fp32 matmuls.
    """
    rate = _matmul_rate(device, DTYPES[precision], n or (8192 if device.type == "cuda" else 1024), reps)
    if device.type == "cpu" and precision != "fp32":
        rate = max(rate, measured_peak(device, "fp32", n, reps))
    return rate


def _matmul_rate(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def spec_peak(device: torch.device, precision: str) -> float | None:
    """The data sheet's dense peak (FLOP/s) for a known GPU; fp32 means TF32 when TF32 is on."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    key = "tf32" if precision == "fp32" and tf32_enabled() else precision
    for pattern, peaks in SPEC_PEAK_TFLOPS:
        if pattern in name:
            return peaks[key] * 1e12
    return None


def sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits (CPU TFLOP/s are thousandths)."""
    return float(f"{x:.{digits}g}")


class Peaks:
    """The device's peaks, measured once per precision per run."""

    def __init__(self, device: torch.device):
        self.device = device
        self._measured: dict[str, float] = {}

    def measured(self, precision: str) -> float:
        key = f"{precision}{'-tf32' if precision == 'fp32' and tf32_enabled() else ''}"
        if key not in self._measured:
            self._measured[key] = measured_peak(self.device, precision)
        return self._measured[key]

    def figure(self, flops: float, seconds: float, precision: str) -> dict:
        """Achieved FLOP/s next to the peaks, and MFU against each."""
        achieved = flops / seconds
        peak = self.measured(precision)
        out = {
            "gflop": sig(flops / 1e9),
            "achieved_tflops": sig(achieved / 1e12),
            "peak_measured_tflops": sig(peak / 1e12),
            "mfu_of_measured": sig(achieved / peak, 3),
        }
        spec = spec_peak(self.device, precision)
        if spec is not None:
            out["peak_spec_tflops"] = round(spec / 1e12, 1)
            out["mfu"] = sig(achieved / spec, 3)
        else:
            out["mfu"] = out["mfu_of_measured"]
        return out
