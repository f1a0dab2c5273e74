"""Object storage: a local folder or an S3 bucket (AWS, MinIO, any S3-compatible store), one API.

The S3 backend lives in `ray_unlearn.storage_s3`; `open_store` picks the backend from the URI.

Keys are '/'-separated relative paths, checked before any file or network access so that a key
built from outside input can never reach outside the store. Every write is atomic (a reader sees
the old object or the new one, never half of one), and `put_if_absent` is an atomic
create-if-not-exists: the request queue builds its locks on it, so it must hold on both backends.
"""

from __future__ import annotations

import errno
import json
import os
import re
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

_TMP = ".~tmp-"  # local temp files start with this; no key part may

STORE_ENV = "RAY_UNLEARN_STORE"
DEFAULT_STORE = "./ray_unlearn_store"


def store_uri(explicit: str | Path | None = None) -> str:
    """The store every command uses: the explicit option, else $RAY_UNLEARN_STORE, else ./ray_unlearn_store."""
    return str(explicit or os.environ.get(STORE_ENV) or DEFAULT_STORE)


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


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def uri(self, key: str = "") -> str:
        # a plain absolute path: every tool (torch, diffusers, mlflow) accepts it
        return str(self.root / check_key(key)) if key else str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _write_temp(self, path: Path, data: bytes) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f"{_TMP}{path.name}-{uuid.uuid4().hex[:12]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the queue is durable: survive a power cut, not only a kill
        return tmp

    def _put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            os.replace(tmp, path)  # atomic: readers see the old file or the new one
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        tmp = self._write_temp(path, data)
        try:
            # link() fails if the name exists, atomically, and the file is complete when it appears
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            # no hard links here (some FUSE/SMB mounts): O_EXCL is still an atomic create, but a
            # reader may see the file for an instant before its bytes are in
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFoundError(key, self.uri()) from None

    def _exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass

    def _list(self, prefix: str) -> list[str]:
        # walk only the folder the prefix points into, then filter by the string prefix
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self._path(head) if head else self.root
        if not start.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(start):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if name.startswith(_TMP):
                    continue
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return keys


def open_store(uri: str | Path, *, endpoint_url: str | None = None) -> Store:
    """'s3://bucket/prefix' (endpoint from `endpoint_url`, $RAY_UNLEARN_S3_ENDPOINT_URL or
    $AWS_ENDPOINT_URL), 'file:///path' or a plain local folder path."""
    text = str(uri)
    if text.startswith("s3://"):
        bucket, _, prefix = text[5:].partition("/")
        from ray_unlearn.storage_s3 import S3Store

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
    import hashlib
    import shutil

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
