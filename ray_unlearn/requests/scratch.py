"""A batch's scratch directory: the one place a request's picture (and the hotfix before upload)
touches the local disk, removed on every exit path, and swept by the next processor when the
batch that made it died (SIGKILL leaves no chance to clean up).

Each directory holds a `.holder` file that its batch keeps locked (`flock`) for as long as it
lives; the kernel drops the lock when the process dies, however it dies. `sweep` removes every
scratch directory whose lock it can take, and directories without a lock file that are older
than a minute (a batch that died between creating the directory and locking it, or one made by
a version of ray-unlearn before this one).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

PREFIX = "ray-unlearn-batch-"
_LOCK = ".holder"
_UNLOCKED_GRACE_S = 60.0


class Scratch:
    """`with Scratch(holder) as path:` a private directory under the temp root ($TMPDIR)."""

    def __init__(self, holder: str, root: str | Path | None = None):
        self.holder, self.root = holder, Path(root or tempfile.gettempdir())
        self.path: Path | None = None
        self._fd: int | None = None

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=self.root))  # mode 0700
        # locked under another name, then renamed: a sweeper never finds the lock file unlocked
        self._fd = os.open(self.path / (_LOCK + ".new"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.write(self._fd, json.dumps({"holder": self.holder, "pid": os.getpid(), "at": time.time()}).encode())
        os.rename(self.path / (_LOCK + ".new"), self.path / _LOCK)
        return self.path

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None
        if self._fd is not None:
            os.close(self._fd)  # after the removal: a sweeper never sees it unlocked while it still holds files
            self._fd = None


def sweep(root: str | Path | None = None) -> list[Path]:
    """Remove the scratch directories of batches that are gone; returns what was removed."""
    removed = []
    for d in sorted(Path(root or tempfile.gettempdir()).glob(PREFIX + "*")):
        try:
            if not d.is_dir() or d.is_symlink() or d.stat().st_uid != os.getuid():
                continue  # not ours to judge
            if _holder_gone(d):
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
        except OSError as err:  # a directory vanishing under us is fine; anything else is worth a line
            logger.debug("scratch sweep skipped %s: %s", d, err)
    if removed:
        logger.info("removed %d scratch director%s left by batches that died", len(removed),
                    "y" if len(removed) == 1 else "ies")
    return removed


def _holder_gone(d: Path) -> bool:
    lock = d / _LOCK
    if not lock.exists():
        return time.time() - d.stat().st_mtime > _UNLOCKED_GRACE_S
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its batch is alive
    finally:
        os.close(fd)  # (releases the lock we may have taken)
    return True
