"""Which failures mean the infrastructure (object storage, MLflow, Ray), not the request or the user."""

from __future__ import annotations

import sys


def infrastructure_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean storage, MLflow or Ray could not be reached or refused us (exit 4).
    Ray's own are included only once Ray is imported: without it, none of them can be raised."""
    from mlflow.exceptions import MlflowException

    from ray_unlearn.storage import StorageError

    errors: tuple[type[BaseException], ...] = (StorageError, MlflowException, ConnectionError)
    if "ray" in sys.modules:
        import ray.exceptions

        errors += (ray.exceptions.RaySystemError, ray.exceptions.GetTimeoutError)
    return errors
