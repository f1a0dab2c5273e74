"""The platform layer: Ray around the engine. The engine (`ray_unlearn.engine`) knows nothing of Ray."""

from ray_unlearn.platform.train import run_train, train_loop_per_worker

__all__ = ["run_train", "train_loop_per_worker"]
