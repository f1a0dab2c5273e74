"""Configuration and the one error type of the metrics layer.

Kept free of heavy imports so callers (CLI, Ray workers) can import the error type and config
cheaply. This layer never imports ray, mlflow or boto3.
"""

from __future__ import annotations

from dataclasses import dataclass


class MetricUnavailable(RuntimeError):
    """A metric's real weights could not be found.

    We never fall back to random or substitute weights: a number computed with them would look
    like a measurement and mean nothing. Callers catch this and record ``str(e)``, which carries
    both the reason and the fix.
    """

    def __init__(self, metric: str, reason: str, fix: str):
        self.metric = metric
        self.reason = reason
        self.fix = fix
        super().__init__(f"{metric} unavailable: {reason} Fix: {fix}")

    # Exceptions cross process boundaries (Ray workers); the default pickling would call
    # cls(message) and fail on our three-argument constructor.
    def __reduce__(self):
        return (type(self), (self.metric, self.reason, self.fix))


@dataclass
class MetricsConfig:
    """Where to find each metric's weights. ``None`` means: standard cache, then offline package."""

    sscd_path: str | None = None
    lpips_net: str = "alex"  # "alex" | "vgg"
    lpips_backbone_path: str | None = None
    fid_inception_path: str | None = None
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.lpips_net not in ("alex", "vgg"):
            raise ValueError(f"lpips_net must be 'alex' or 'vgg', got {self.lpips_net!r}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
