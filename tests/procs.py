"""`run`: subprocess.run for tests, in its own process group that is killed on every way out.

subprocess.run kills only the child it started when the time-out hits; a child's own children
(a CLI's workers, Chromium's helpers, a server's uvicorn) would live on. Here the child leads a new
session, and on a time-out, an interrupt or any error the whole group gets SIGKILL, by its id.
"""

from __future__ import annotations

import os
import signal
import subprocess


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this call started (its leader's PID), nothing else
    except (ProcessLookupError, PermissionError):
        pass


def run(cmd: list, timeout: float, *, capture: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run `cmd` to the end (text output captured unless `capture=False`); on a time-out raise
    subprocess.TimeoutExpired after killing its whole process group."""
    if capture:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        kill_group(proc)
        proc.communicate()  # reap it and close the pipes
        raise
    kill_group(proc)  # anything it left behind in its group
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
