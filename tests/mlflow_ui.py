"""The MLflow UI in a real headless browser: serve a store with `mlflow ui`, render pages in
Chromium, read back the DOM and take screenshots. Used by tests/test_mlflow_ui.py and, for the
README's pictures, by hand:

    python tests/mlflow_ui.py runs/demo/mlflow.db docs/      # writes docs/mlflow_*.png

The server runs in its own process group and is stopped by that group's id (never by name).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import procs

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_ui(db: Path):
    """`mlflow ui` on a sqlite store, on a free loopback port; yields its base URL."""
    port = _free_port()
    mlflow = Path(sys.executable).with_name("mlflow")
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{Path(db).resolve()}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300  # a loaded 2-core machine: half a minute is common
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"mlflow ui did not start on {url}:\n{log.read()[-3000:].decode(errors='replace')}") from None
                time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # uvicorn runs as a child: stop the whole group
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def render(url: str, screenshot: Path | None = None, size: str = "1600,1000", wait_ms: int = 15000) -> str:
    """The page's DOM after its scripts ran (and a screenshot when asked)."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("no Chromium: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        base = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                f"--virtual-time-budget={wait_ms}"]
        dom = procs.run([*base, "--dump-dom", url], timeout=180).stdout
        if screenshot is not None:
            procs.run([*base, f"--screenshot={Path(screenshot).resolve()}", url], timeout=180)
    return dom


def pages(db: Path) -> dict[str, str]:
    """The pages worth looking at: the experiment's runs, a trial's integrity grid, the registry."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{Path(db).resolve()}")
    exp = client.get_experiment_by_name("ray-unlearn")
    runs = client.search_runs([exp.experiment_id], "tags.trial_id != ''", max_results=1, order_by=["attributes.start_time ASC"])
    out = {"runs": f"#/experiments/{exp.experiment_id}/runs"}
    if runs:
        out["trial"] = f"#/experiments/{exp.experiment_id}/runs/{runs[0].info.run_id}"
        out["metric"] = f"#/experiments/{exp.experiment_id}/runs/{runs[0].info.run_id}/model-metrics"
        out["grid"] = f"#/experiments/{exp.experiment_id}/runs/{runs[0].info.run_id}/artifacts/integrity_grid.png"
    out["registry"] = "#/models/ray-unlearn-hotfix"
    return out


if __name__ == "__main__":
    db, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    with mlflow_ui(db) as base:
        for name, frag in pages(db).items():
            dom = render(f"{base}/{frag}", out_dir / f"mlflow_{name}.png")
            print(f"{name}: {base}/{frag} -> {out_dir / f'mlflow_{name}.png'} ({len(dom)} chars of DOM)")
