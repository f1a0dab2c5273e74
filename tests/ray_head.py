"""A real local Ray head for `ray job submit` tests, and `submit` to run a jobs/ script on it.

    from ray_head import ray_head, submit  # noqa: F401  (ray_head is a module-scoped fixture)

    def test_x(ray_head):
        rc, output = submit(ray_head, "jobs/x.py", "--json")

The head is `ray start --head --block` as a subprocess in its own session, so its process group
is ours alone: teardown signals that group (never `ray stop`, never a process name: other work
shares the machine). Processes that Ray moves out of the group (each worker and each job driver
gets its own) exit when the raylet does; any that linger are found by a marker in their
environment that only this head's descendants carry, and killed by PID.

Token authentication stays on. Ray 2.60 turns it on for a `ray start --head` when RAY_AUTH_MODE
is unset and a token exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), and a
client such as `ray job submit` with an explicit --address sends its token only when
RAY_AUTH_MODE=token is set in its own environment. Whether ~/.ray/auth_token exists differs
between machines, so the head and every client here get RAY_AUTH_MODE=token and a fresh
RAY_AUTH_TOKEN (the variable wins over the file): the same authenticated cluster everywhere,
and ~/.ray is neither read nor written. Job drivers inherit both variables from the raylet.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import procs
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(os.path.abspath(sys.executable)).parent  # the venv running the tests (symlinks kept): its `ray` and `python`
MARKER = "RU_TEST_RAY_HEAD"
# the job's working_dir is the checkout; .gitignore'd paths are left out by Ray already
WORKING_DIR_EXCLUDES = [".git", "ray_unlearn_store", "runs", "mlruns", "*.egg-info"]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class RayHead:
    proc: subprocess.Popen
    temp_dir: Path
    dashboard_port: int
    token: str
    env: dict = field(repr=False)  # for client subprocesses: auth, PATH, no RAY_ADDRESS
    marker: str = ""

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def get(self, path: str, token: str | None = "") -> tuple[int, str]:
        """GET on the dashboard; `token` "" = this head's token, None = no Authorization header."""
        req = urllib.request.Request(self.address + path)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token or self.token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def log_tail(self, n: int = 4000) -> str:
        log = self.temp_dir / "ray-start.log"
        return log.read_text(errors="replace")[-n:] if log.is_file() else ""

    def marked_pids(self) -> list[int]:
        """Live processes whose environment carries this head's marker: only its descendants."""
        needle = f"{MARKER}={self.marker}".encode()
        pids = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == os.getpid():
                continue
            try:
                if needle in (p / "environ").read_bytes().split(b"\0"):
                    pids.append(int(p.name))
            except OSError:  # gone, or not ours to read
                continue
        return pids

    def stop(self, timeout: float = 60) -> list[int]:
        """Stop what this head started; returns the PIDs that had to be killed one by one."""
        pgid = self.proc.pid  # start_new_session: the leader's PID is the group's id
        for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 30)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        deadline = time.monotonic() + 20  # workers and drivers notice the raylet is gone
        while (stray := self.marked_pids()) and time.monotonic() < deadline:
            time.sleep(1)
        for pid in stray:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return stray


def start_head(num_cpus: int = 2, timeout: float = 240) -> RayHead:
    # short: Ray's socket paths under the temp dir must stay below the 107-byte limit
    temp_dir = Path(tempfile.mkdtemp(prefix="ruj-", dir="/tmp"))
    gcs, dash, agent_http, agent_grpc, rt_env, metrics, node_mgr, obj_mgr = free_ports(8)
    token, marker = secrets.token_hex(32), uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_JOB_HEADERS")}
    env.update({
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this venv's
        "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
    })
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--temp-dir", str(temp_dir),
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--include-dashboard=true", "--num-cpus", str(num_cpus), "--num-gpus", "0",
           "--disable-usage-stats",
           # every fixed default port too: other Ray clusters may be running on this machine
           "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
           # (no --ray-client-server-port: naming it requires ray[client], which is not installed)
           "--runtime-env-agent-port", str(rt_env), "--metrics-export-port", str(metrics), "--node-manager-port", str(node_mgr),
           "--object-manager-port", str(obj_mgr)]
    with open(temp_dir / "ray-start.log", "wb") as log:
        proc = subprocess.Popen(cmd, env={**env, MARKER: marker}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=temp_dir)
    head = RayHead(proc, temp_dir, dash, token, env, marker)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = head.log_tail()
            head.stop()
            raise RuntimeError(f"`ray start --head` exited with {proc.returncode}:\n{tail}")
        try:
            status, _ = head.get("/api/jobs/")
        except OSError:  # not listening yet
            status = None
        if status == 200:
            return head
        if time.monotonic() > deadline:
            tail = head.log_tail()
            head.stop()
            raise RuntimeError(f"the Ray job API did not answer within {timeout:.0f} s (last: {status}):\n{tail}")
        time.sleep(1)


def dashboard_missing() -> str | None:
    """Why this Ray cannot serve the job API (it lives in the dashboard), or None."""
    try:
        from ray._private.utils import get_dashboard_dependency_error
    except ImportError:
        return None  # let `ray start` say what is wrong
    err = get_dashboard_dependency_error()
    return f"the Ray job API needs ray[default] (the dashboard): {err}" if err else None


@pytest.fixture(scope="module")
def ray_head():
    if why := dashboard_missing():
        pytest.skip(why)
    head = start_head()
    yield head
    head.stop()


def submit(head: RayHead, script: str, *args: str, timeout: float = 900,
           env_vars: dict | None = None) -> tuple[int, str]:
    """`ray job submit` a jobs/ script to `head` and wait for it: (exit code, combined output).

    The working_dir is the checkout: the driver starts in Ray's unpacked copy of it (so the
    relative `jobs/X.py` resolves) and Ray puts that copy on PYTHONPATH for the driver and every
    worker, so the job runs this tree's code, as on a cluster without the package installed.
    The output holds the driver's log (streamed until the job ends); the exit code is 1 when
    the job failed.
    """
    runtime_env = {"excludes": WORKING_DIR_EXCLUDES,
                   "env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_vars or {})}}
    job_id = f"test-{Path(script).stem}-{uuid.uuid4().hex[:8]}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head.address, "--submission-id", job_id,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env),
           "--", "python", script, *args]
    try:
        r = procs.run(cmd, env=head.env, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        # the client is gone (procs.run killed it); the job itself runs on the head: stop it too
        procs.run([str(BIN / "ray"), "job", "stop", "--address", head.address, job_id], env=head.env, timeout=120)
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        return 124, f"{out}\n[submit timed out after {timeout:.0f} s; job {job_id} stopped]"
    return r.returncode, r.stdout + r.stderr


def last_json(output: str) -> dict:
    """The last line of `output` that is a JSON object (a job's --json result among its logs)."""
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    raise AssertionError(f"no JSON object line in the job output:\n{output[-4000:]}")
