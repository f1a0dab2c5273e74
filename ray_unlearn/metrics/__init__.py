"""Metrics for judging diffusion-model unlearning: SSCD, LPIPS, SSIM, FID.

Real weights only, offline-first: each metric's weights come from (1) a configured path, then
(2) the standard torch.hub cache, then (3) an installed pip package that ships them. Nothing is
ever downloaded and nothing is ever randomly initialised; when weights are missing the metric
raises MetricUnavailable with the reason and the fix. This package does not import ray, mlflow
or boto3.
"""

from .config import MetricUnavailable
from .core import Metrics
from .fid import frechet_distance
from .sscd import SSCD_INPUT_EDGE, sscd_similarity_matrix

__all__ = [
    "Metrics",
    "MetricUnavailable",
    "SSCD_INPUT_EDGE",
    "frechet_distance",
    "sscd_similarity_matrix",
]
