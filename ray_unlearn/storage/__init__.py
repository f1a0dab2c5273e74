"""Object storage: a local folder or an S3 bucket (AWS, MinIO, any S3-compatible store), one API.

`open_store` picks the backend from the URI: `base` holds the API, the key checks and the errors,
`local` the folder backend, `s3` the bucket backend (boto3 is imported only when an s3:// store is
opened). `materialize` turns a stored model into a local folder: the engine only ever loads local paths.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from ray_unlearn.storage.base import (
    _TMP,
    DEFAULT_STORE,
    ENDPOINT_ENV,
    STORE_ENV,
    NotFoundError,
    StorageError,
    Store,
    check_key,
    s3_endpoint,
    store_uri,
)
from ray_unlearn.storage.local import LocalStore

__all__ = ["DEFAULT_STORE", "ENDPOINT_ENV", "STORE_ENV", "LocalStore", "NotFoundError", "StorageError", "Store",
           "check_key", "materialize", "open_store", "s3_endpoint", "store_uri"]


def open_store(uri: str | Path, *, endpoint_url: str | None = None) -> Store:
    """'s3://bucket/prefix' (endpoint from `endpoint_url`, $RAY_UNLEARN_S3_ENDPOINT_URL or
    $AWS_ENDPOINT_URL), 'file:///path' or a plain local folder path."""
    text = str(uri)
    if text.startswith("s3://"):
        bucket, _, prefix = text[5:].partition("/")
        from ray_unlearn.storage.s3 import S3Store  # boto3 loads only for an s3:// store

        return S3Store(bucket, prefix, endpoint_url=endpoint_url)
    if "://" in text and not text.startswith("file://"):
        raise ValueError(f"unsupported store URI {text!r}: use a local folder path or s3://bucket/prefix")
    return LocalStore(text[7:] if text.startswith("file://") else text)


def materialize(uri: str | Path, cache_root: str | Path) -> Path:
    """A local directory holding the model at `uri`: a local path is returned as it is; an
    's3://bucket/prefix' is downloaded once into `cache_root/<hash of the URI>/`.

    The download goes to a temp folder that is renamed into place when complete, so a crash
    never leaves a half-downloaded model that a later call would trust. The prefix is assumed
    immutable (the batch processor writes each hotfix once, under its batch id).
    """
    text = str(uri)
    if not text.startswith("s3://"):
        return Path(text[7:] if text.startswith("file://") else text)
    root = Path(cache_root).expanduser()
    dest = root / hashlib.sha256(text.rstrip("/").encode()).hexdigest()[:24]
    if dest.is_dir():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{_TMP}{dest.name}-{uuid.uuid4().hex[:12]}"
    try:
        if not open_store(text.rstrip("/")).download_dir("", tmp):
            raise NotFoundError(text, "S3 (no objects under this prefix)")
        try:
            os.rename(tmp, dest)  # atomic; fails if another process finished first
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
