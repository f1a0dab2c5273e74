"""Models in object storage, made local for the engine (which loads local folders and hub ids only).

A hotfix registered by the batch processor or a search lives at an s3:// prefix; every process
that loads it (a CLI command, a Ray Train worker on another node, a re-check task) downloads it
once into its own cache (`storage.materialize`: content-addressed by URI, atomic, reused).
"""

from __future__ import annotations

from pathlib import Path

from ray_unlearn.config import UnlearnConfig
from ray_unlearn.storage import materialize


def local_model(path: str, cfg: UnlearnConfig) -> str:
    """`path` itself when local (a folder, `demo`, a hub id); an s3:// model's local copy under
    cfg.cache_dir/models otherwise."""
    if not str(path).startswith("s3://"):
        return str(path)
    return str(materialize(path, Path(cfg.cache_dir).expanduser() / "models"))


def with_local_model(cfg: UnlearnConfig) -> UnlearnConfig:
    """`cfg` with model.path local (see `local_model`); the same object when it already is."""
    path = local_model(cfg.model.path, cfg)
    if path == cfg.model.path:
        return cfg
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": path})})
