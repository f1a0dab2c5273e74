"""The one error type of the metrics layer.

Kept free of heavy imports so callers (CLI, Ray workers) can import it cheaply. Where to find each
metric's weights is `ray_unlearn.config.MetricsSettings` (the `eval.metrics` section of a run's
config), which the metrics take directly. This layer never imports ray, mlflow or boto3.
"""

from __future__ import annotations


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
