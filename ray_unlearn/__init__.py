"""ray_unlearn: remove specific outputs from a trained diffusion model, without a prompt, and prove it.

Nothing heavy is imported here (torch, Ray, MLflow load with the modules that need them), so
`import ray_unlearn` and `ray-unlearn --help` stay fast.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ray-unlearn")
except PackageNotFoundError:  # a checkout on sys.path without `pip install` (a job's working dir)
    __version__ = "0+unknown"
