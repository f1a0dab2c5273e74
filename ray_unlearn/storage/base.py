"""The store API every backend implements, key checks, errors, and the default store and endpoint.

Keys are '/'-separated relative paths, checked before any file or network access so that a key
built from outside input can never reach outside the store. Every write is atomic (a reader sees
the old object or the new one, never half of one), and `put_if_absent` is an atomic
create-if-not-exists: the request queue builds its locks on it, so it must hold on both backends.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

_TMP = ".~tmp-"  # local temp files start with this; no key part may

STORE_ENV = "RAY_UNLEARN_STORE"
DEFAULT_STORE = "./ray_unlearn_store"


def store_uri(explicit: str | Path | None = None) -> str:
    """The store every command uses: the explicit option, else $RAY_UNLEARN_STORE, else ./ray_unlearn_store."""
    return str(explicit or os.environ.get(STORE_ENV) or DEFAULT_STORE)


ENDPOINT_ENV = ("RAY_UNLEARN_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")


def s3_endpoint(explicit: str | None = None) -> str | None:
    """The S3-compatible endpoint (MinIO, a test server): the explicit one, else
    $RAY_UNLEARN_S3_ENDPOINT_URL, else $AWS_ENDPOINT_URL; None means AWS itself."""
    return explicit or next((os.environ[e] for e in ENDPOINT_ENV if os.environ.get(e)), None)


class StorageError(RuntimeError):
    """The store could not be reached or answered something unusable."""


class NotFoundError(KeyError):
    def __init__(self, key: str, where: str = ""):
        super().__init__(key)
        self.key = key
        self.where = where

    def __str__(self) -> str:
        return f"no object '{self.key}' in {self.where or 'the store'}"


def check_key(key: str, *, prefix: bool = False) -> str:
    """The key itself when it is a safe relative path; a ValueError that says why otherwise.

    A prefix (for `list`) may be empty or end with '/'.
    """
    if not isinstance(key, str):
        raise ValueError(f"a storage key must be a string, got {type(key).__name__}")
    if prefix and key == "":
        return key
    if not key:
        raise ValueError("a storage key must not be empty")
    if "\\" in key or "\x00" in key:
        raise ValueError(f"storage key {key!r}: backslashes and NUL are not allowed; use '/' between parts")
    if any(ord(c) < 32 for c in key):
        raise ValueError(f"storage key {key!r}: control characters are not allowed")
    if key.startswith("/") or re.match(r"^[A-Za-z]:", key):
        raise ValueError(f"storage key {key!r}: must be relative (no leading '/' or drive letter)")
    if len(key.encode()) > 1024:
        raise ValueError(f"storage key {key[:60]!r}...: longer than 1024 bytes (the S3 limit)")
    parts = key.split("/")
    if prefix and parts[-1] == "":
        parts = parts[:-1]
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(f"storage key {key!r}: empty, '.' and '..' parts are not allowed")
        if part.startswith(_TMP):
            raise ValueError(f"storage key {key!r}: parts starting with '{_TMP}' are reserved for temp files")
    return key


class Store(ABC):
    """The common API. Subclasses implement the `_`-methods on already-checked keys."""

    def put_bytes(self, key: str, data: bytes) -> None:
        self._put(check_key(key), bytes(data))

    def get_bytes(self, key: str) -> bytes:
        return self._get(check_key(key))

    def exists(self, key: str) -> bool:
        return self._exists(check_key(key))

    def delete(self, key: str) -> None:
        """Deleting a missing key is not an error (deletes are retried after crashes)."""
        self._delete(check_key(key))

    def list(self, prefix: str = "") -> list[str]:
        """Sorted keys that start with `prefix` (a plain string prefix, as in S3)."""
        return sorted(self._list(check_key(prefix, prefix=True)))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Atomically create `key`; False (and nothing written) when it already exists."""
        return self._put_if_absent(check_key(key), bytes(data))

    def put_json(self, key: str, obj: Any) -> None:
        self.put_bytes(key, json.dumps(obj, indent=2, sort_keys=True).encode())

    def get_json(self, key: str) -> Any:
        data = self.get_bytes(key)
        try:
            return json.loads(data)
        except ValueError as err:
            raise StorageError(f"{self.uri(key)} is not valid JSON ({err})") from None

    def upload_dir(self, local_dir: str | Path, prefix: str) -> list[str]:
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StorageError(f"upload_dir: {local_dir} is not a directory")
        keys = []
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            key = _join(prefix, path.relative_to(local_dir).as_posix())
            self.put_bytes(key, path.read_bytes())
            keys.append(key)
        return keys

    def download_dir(self, prefix: str, local_dir: str | Path) -> list[Path]:
        local_dir = Path(local_dir).resolve()
        base = _join(prefix, "")
        keys, out = self.list(base), []
        # listed keys may come from another writer: check them all before any names a local file
        dests = [(local_dir / check_key(key[len(base):])).resolve() for key in keys]
        for key, dest in zip(keys, dests):
            if local_dir not in dest.parents:
                raise StorageError(f"download_dir: key {key!r} would leave {local_dir}")
        for key, dest in zip(keys, dests):
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(self.get_bytes(key))
            out.append(dest)
        return out

    @abstractmethod
    def uri(self, key: str = "") -> str: ...

    @abstractmethod
    def _put(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def _get(self, key: str) -> bytes: ...

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    @abstractmethod
    def _delete(self, key: str) -> None: ...

    @abstractmethod
    def _list(self, prefix: str) -> list[str]: ...

    @abstractmethod
    def _put_if_absent(self, key: str, data: bytes) -> bool: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri()!r})"


def _join(prefix: str, rest: str) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{rest}" if prefix else rest
