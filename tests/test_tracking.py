"""MLflow layer: runs, metric history, artifacts (and the privacy rule), registry, promotion, CLI.

Fast tests use a sqlite store in tmp_path, copied from one migrated template database (creating
MLflow's tables takes ~10 s, copying the file milliseconds). Reports are small dicts by hand.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import procs
import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ray_unlearn.exit_codes import ExitCode
from ray_unlearn.platform.tracking import (
    DEFAULT_MODEL_NAME,
    SERVING_ALIAS,
    PromotionRefused,
    Registry,
    Tracker,
    Version,
    tracking_uri,
    version_tags,
)

H1, H2 = "a" * 64, "b" * 64


@pytest.fixture(scope="module")
def template_db(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # creates and migrates the tables
    return path


@pytest.fixture
def uri(template_db, tmp_path) -> str:
    shutil.copy(template_db, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def make_report(sscd=(0.53,), threshold=0.63, ssim=0.80, min_ssim=0.6, artifact=False, **over) -> dict:
    rows = [
        {"id": f"jane_doe_{i}", "content_sha256": h, "seed": None, "sscd_base": 0.99, "sscd_unlearned": s,
         "below_threshold": s < threshold, "artifact": artifact, "forgotten": s < threshold and not artifact}
        for i, (s, h) in enumerate(zip(sscd, (H1, H2)))
    ]
    forgotten = all(r["forgotten"] for r in rows)
    ok = ssim is not None and ssim >= min_ssim
    report = {
        "method": "surrogate",
        "config": {"targets": [{"image": "/data/faces/jane_doe.png", "seed": None, "noise": None}],
                   "surrogate": {"kind": "provided", "paths": ["/data/faces/jane_doe_edit.png"]},
                   "train": {"lr": 3e-5, "steps": 60}},
        "targets": rows,
        "forget_threshold": {"value": threshold, "kind": "calibrated", "source": "p95 of SSCD between 32 images"},
        "integrity": {"n": 32, "ssim": ssim, "lpips": 0.12, "fid": 56.5, "min_ssim": min_ssim, "ok": ok,
                      "unavailable": {}},
        "all_forgotten": forgotten,
        "passed": forgotten and ok,
        "wall_seconds": 241.3,
        "steps": 60,
    }
    report.update(over)
    return report


# -- tracking URI and runs -----------------------------------------------------------------------


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri() == "http://127.0.0.1:5000"
    assert tracking_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    # a relative sqlite path would open another database in a Ray worker with another cwd
    assert tracking_uri("sqlite:///rel/m.db") == f"sqlite:///{tmp_path}/rel/m.db"


def test_parent_and_child_runs_in_the_named_experiment(uri, monkeypatch, tmp_path):
    client = MlflowClient(tracking_uri=uri)
    elsewhere = client.create_experiment("elsewhere", artifact_location=(tmp_path / "else").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", elsewhere)  # a Ray worker inherits the driver's env

    tracker = Tracker(uri, experiment="unlearn-test")
    assert tracker.experiment_id != elsewhere
    assert Tracker(uri, experiment="unlearn-test").experiment_id == tracker.experiment_id  # found, not re-created
    params = {"train": {"lr": 3e-5, "steps": 60}, "targets": [{"image": "/data/faces/jane_doe.png", "seed": 3}],
              "note": "x" * 7000}
    parent = tracker.start_run("search", params=params, tags={"request": "r-1"})
    child = tracker.start_run("trial-0", parent_run_id=parent)

    p, c = client.get_run(parent), client.get_run(child)
    assert p.info.experiment_id == c.info.experiment_id == tracker.experiment_id
    assert c.data.tags["mlflow.parentRunId"] == parent
    assert c.info.run_name == "trial-0" and p.data.tags["request"] == "r-1"
    assert p.data.params["train.lr"] == "3e-05" and p.data.params["train.steps"] == "60"
    assert len(p.data.params["note"]) == 6000  # truncated to MLflow's limit instead of failing
    assert "jane_doe" not in json.dumps(p.data.params) and '"seed": 3' in p.data.params["targets"]
    # artifacts of a sqlite store live beside the database, not in whatever cwd created the experiment
    assert p.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())

    tracker.end_run(child, "FAILED")
    assert client.get_run(child).info.status == "FAILED"
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        tracker.end_run(parent, "DONE")
    assert client.get_run(parent).info.status == "RUNNING"


def test_child_run_from_another_process(uri, tmp_path):
    """What a Ray Tune trial does: unpickle the driver's Tracker in another process, with another
    cwd and MLFLOW_EXPERIMENT_ID pointing elsewhere, and create a child run of the driver's run."""
    tracker = Tracker(uri, experiment="unlearn-test")
    parent = tracker.start_run("search")
    (tmp_path / "tracker.pkl").write_bytes(pickle.dumps(tracker))
    cwd = tmp_path / "worker"
    cwd.mkdir()
    code = (
        "import pickle, sys; t = pickle.loads(open(sys.argv[1], 'rb').read()); "
        "r = t.start_run('trial-1', parent_run_id=sys.argv[2]); t.log_history(r, [{'step': 3, 'loss': 0.5}]); "
        "t.end_run(r); print(r)"
    )
    env = {**os.environ, "MLFLOW_EXPERIMENT_ID": "0", "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    out = procs.run([sys.executable, "-c", code, str(tmp_path / "tracker.pkl"), parent], cwd=cwd, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    child = MlflowClient(tracking_uri=uri).get_run(out.stdout.strip().splitlines()[-1])
    assert child.info.experiment_id == tracker.experiment_id
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert child.info.status == "FINISHED" and child.data.metrics["loss"] == 0.5
    assert not (cwd / "mlflow.db").exists() and not (cwd / "mlruns").exists()


def test_history_is_logged_per_step(uri):
    tracker = Tracker(uri)
    run = tracker.start_run("r")
    history = [{"step": k, "loss/forget": 1.0 / (k + 1), "loss/remember": 0.1 * k, "phase": "train", "skip": None}
               for k in range(1500)]  # more metrics than one log_batch may carry
    tracker.log_history(run, history)
    got = tracker.client.get_metric_history(run, "loss/forget")
    assert [m.step for m in got] == list(range(1500))
    assert got[3].value == pytest.approx(0.25)
    assert len(tracker.client.get_metric_history(run, "loss/remember")) == 1500
    assert set(tracker.client.get_run(run).data.metrics) == {"loss/forget", "loss/remember"}


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_report_logs_figures_grid_and_report_but_never_target_pictures(uri, tmp_path):
    out = tmp_path / "run"
    (out / "samples").mkdir(parents=True)
    for name in ("before_after.png", "integrity_grid.png", "samples/jane_doe_0-after.png", "jane_doe.png"):
        (out / name).write_bytes(b"\x89PNG fake " + name.encode())
    tracker = Tracker(uri)
    run = tracker.start_run("request-1")
    tracker.log_report(run, make_report(), out_dir=out, storage_uri="s3://hotfixes/requests/r-1/")

    client = tracker.client
    assert _artifact_paths(client, run) == {"report.json", "integrity_grid.png"}
    logged = Path(client.download_artifacts(run, "report.json", str(tmp_path / "dl"))).read_text()
    assert "jane_doe" not in logged  # target ids and paths are file names of faces: redacted
    assert H1 in logged and json.loads(logged)["passed"] is True
    data = client.get_run(run).data
    assert data.metrics["sscd"] == pytest.approx(0.53) and data.metrics["threshold"] == pytest.approx(0.63)
    assert data.metrics["integrity_ssim"] == pytest.approx(0.80) and data.metrics["fid"] == pytest.approx(56.5)
    assert data.metrics["passed"] == 1.0 and data.metrics["forgotten"] == 1.0
    assert data.metrics["wall_seconds"] == pytest.approx(241.3)
    assert data.tags["target_hashes"] == H1 and data.tags["storage_uri"] == "s3://hotfixes/requests/r-1/"

    for private in (out / "before_after.png", out / "samples" / "jane_doe_0-after.png"):
        with pytest.raises(ValueError, match="personal data"):
            tracker.log_figure(run, private)
    assert _artifact_paths(client, run) == {"report.json", "integrity_grid.png"}
    tracker.log_figure(run, out / "integrity_grid.png", "figures")
    assert "figures/integrity_grid.png" in _artifact_paths(client, run)


# -- tags ----------------------------------------------------------------------------------------


def test_version_tags_from_a_report():
    tags = version_tags(make_report(sscd=(0.53, 0.58)), request_id="r-1", attempt=2)
    assert tags == {
        "passed": "true", "forgotten": "true", "artifact": "false", "sscd": "0.58", "sscd_base": "0.99",
        "threshold": "0.63", "threshold_kind": "calibrated", "integrity_ssim": "0.8", "min_integrity_ssim": "0.6",
        "fid": "56.5", "lpips": "0.12", "method": "surrogate", "target_hashes": f"{H1},{H2}",
        "request_id": "r-1", "attempt": "2",
    }


def test_version_tags_from_partial_reports_never_crash():
    assert version_tags({}) == {"passed": "false", "forgotten": "false"}
    partial = {"targets": [], "forget_threshold": None, "integrity": {"ssim": None, "fid": None}, "passed": False}
    assert version_tags(partial) == {"passed": "false", "forgotten": "false"}


# -- registry ------------------------------------------------------------------------------------


def test_register_is_idempotent_with_a_key(uri, tmp_path):
    reg = Registry(uri)
    hotfix = tmp_path / "hotfix"
    hotfix.mkdir()
    a = reg.register(str(hotfix), run_id=None, tags=version_tags(make_report()), idempotency_key="req-1:try-0")
    again = reg.register(str(hotfix), run_id=None, tags=version_tags(make_report()), idempotency_key="req-1:try-0")
    assert again.version == a.version == 1 and again.source == str(hotfix)
    b = reg.register(str(hotfix), run_id=None, tags={}, idempotency_key="req-2:try-0")
    c = reg.register(str(hotfix), run_id=None, tags={})
    assert (b.version, c.version) == (2, 3)
    assert [v.version for v in reg.versions()] == [1, 2, 3]
    assert [v.version for v in reg.find(idempotency_key="req-1:try-0")] == [1]
    assert reg.get(1).tags["target_hashes"] == H1 and reg.get("1").passed


def test_s3_source_and_run_link_are_kept_as_given(uri):
    tracker = Tracker(uri)
    run = tracker.start_run("request-1")
    v = Registry(uri).register("s3://hotfixes/requests/r-1/hotfix", run_id=run, tags=version_tags(make_report()))
    got = Registry(uri).get(v.version)
    assert got.source == "s3://hotfixes/requests/r-1/hotfix" and got.run_id == run


REFUSALS = {
    "not forgotten": (make_report(sscd=(0.71,)),
                      "version 2 did not forget its target: SSCD 0.71 is not below the threshold 0.63 (calibrated)"),
    "one of two not forgotten": (make_report(sscd=(0.41, 0.71)),
                                 "did not forget all 2 of its targets: the highest SSCD 0.71 is not below"),
    "artifact": (make_report(sscd=(0.31,), artifact=True), "SSCD 0.31 is below the threshold 0.63 (calibrated), but the output is artifact texture"),
    "integrity": (make_report(ssim=0.41), "version 2 fell below the integrity bound: SSIM 0.41 < 0.60"),
    "close call": (make_report(ssim=0.5991), "SSIM 0.5991 < 0.6000"),
    "no ssim": (make_report(ssim=None), "version 2 has no integrity SSIM"),
    "no evaluation": ({}, None),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_promote_refuses_with_the_reason_and_the_alias_stays(uri, case):
    reg = Registry(uri)
    good = reg.register("s3://b/good", run_id=None, tags=version_tags(make_report()))
    reg.promote(good.version)
    report, reason = REFUSALS[case]
    tags = {"owner": "someone"} if case == "no evaluation" else version_tags(report)
    bad = reg.register("s3://b/bad", run_id=None, tags=tags)
    reason = reason or "version 2 has no evaluation tags (was it registered by ray-unlearn?)"

    assert reason in bad.refusal() and not bad.passed
    with pytest.raises(PromotionRefused) as err:
        reg.promote(bad.version)
    assert reason in str(err.value)
    assert reg.serving().version == good.version == 1

    forced = reg.promote(bad.version, force=True)
    assert forced.aliases == [SERVING_ALIAS] and reg.serving().version == 2


def test_promote_moves_the_alias_to_a_passing_version(uri):
    reg = Registry(uri)
    assert reg.serving() is None
    v1 = reg.register("s3://b/v1", run_id=None, tags=version_tags(make_report()))
    v2 = reg.register("s3://b/v2", run_id=None, tags=version_tags(make_report(sscd=(0.40,), ssim=0.9)))
    assert v1.refusal() is None and v2.refusal() is None
    assert reg.promote(v1.version).aliases == ["production"]
    assert reg.promote("2").aliases == ["production"]
    assert [(v.version, v.aliases) for v in reg.versions()] == [(1, []), (2, ["production"])]
    reg.promote(1, alias="staging")
    assert reg.serving("staging").version == 1 and reg.serving().version == 2
    with pytest.raises(LookupError, match="has no version 9"):
        reg.promote(9)


def test_registry_and_tracker_pickle_without_their_client(uri):
    reg = Registry(uri, name="other-model")
    reg.versions()  # connects
    clone = pickle.loads(pickle.dumps(reg))
    assert (clone.uri, clone.name) == (uri, "other-model") and clone.versions() == []


# -- CLI -----------------------------------------------------------------------------------------


def test_cli_promote_and_versions(uri):
    from ray_unlearn.cli import app

    reg = Registry(uri)
    reg.register("s3://b/v1", run_id=None, tags=version_tags(make_report()))
    reg.register("s3://b/v2", run_id=None, tags=version_tags(make_report(sscd=(0.71,))))
    runner = CliRunner()

    ok = runner.invoke(app, ["promote", "1", "--tracking-uri", uri])
    assert ok.exit_code == 0, ok.output
    assert f"{DEFAULT_MODEL_NAME} version 1 now serves as @production (SSCD 0.53 < 0.63, integrity SSIM 0.80)" in ok.output

    refused = runner.invoke(app, ["promote", "2", "--tracking-uri", uri])
    assert refused.exit_code == ExitCode.GATE_REFUSED
    assert "SSCD 0.71 is not below the threshold 0.63" in refused.stderr
    assert reg.serving().version == 1

    missing = runner.invoke(app, ["promote", "7", "--tracking-uri", uri])
    assert missing.exit_code == ExitCode.USAGE and "has no version 7" in missing.stderr

    forced = runner.invoke(app, ["promote", "2", "--tracking-uri", uri, "--force"])
    assert forced.exit_code == 0 and "forced: version 2 did not forget" in forced.output and "was version 1" in forced.output
    assert reg.serving().version == 2

    listed = runner.invoke(app, ["versions", "--tracking-uri", uri, "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [(r["version"], r["aliases"], r["passed"], r["source"]) for r in rows] == [
        (1, [], True, "s3://b/v1"), (2, ["production"], False, "s3://b/v2")]
    table = runner.invoke(app, ["versions", "--tracking-uri", uri])
    lines = [line for line in table.output.splitlines() if line.strip() and set(line.strip()) != {"─"}]
    assert lines[0].split() == ["version", "aliases", "passed", "sscd", "threshold", "ssim", "fid", "source"]
    assert lines[1].split() == ["1", "true", "0.53", "0.63", "0.8", "56.5", "s3://b/v1"]
    assert lines[2].split() == ["2", "@production", "false", "0.71", "0.63", "0.8", "56.5", "s3://b/v2"]


# -- a real tracking server ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_over_a_real_mlflow_server(template_db, tmp_path):
    shutil.copy(template_db, tmp_path / "server.db")
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,  # its own process group: uvicorn runs as a child of `mlflow server`
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert server.poll() is None and time.time() < deadline, (tmp_path / "server.log").read_text()
                time.sleep(1)
        out = tmp_path / "run"
        out.mkdir()
        (out / "integrity_grid.png").write_bytes(b"\x89PNG fake")
        (out / "before_after.png").write_bytes(b"\x89PNG fake")
        tracker = Tracker(uri, experiment="served")
        parent = tracker.start_run("batch")
        child = tracker.start_run("request-1", parent_run_id=parent, params={"train": {"lr": 3e-5}})
        tracker.log_history(child, [{"step": k, "loss/forget": float(k)} for k in range(5)])
        tracker.log_report(child, make_report(), out_dir=out, storage_uri="s3://hotfixes/r-1/")
        assert [m.step for m in tracker.client.get_metric_history(child, "loss/forget")] == list(range(5))
        assert _artifact_paths(tracker.client, child) == {"report.json", "integrity_grid.png"}

        reg = Registry(uri)
        v = reg.register("s3://hotfixes/r-1/hotfix", run_id=child, tags=version_tags(make_report()),
                         idempotency_key="r-1")
        assert reg.register("s3://hotfixes/r-1/hotfix", run_id=child, tags={}, idempotency_key="r-1").version == v.version
        # the server (unlike a local store) refuses a local path as a model source
        with pytest.raises(ValueError, match="upload the hotfix to object storage"):
            reg.register(str(tmp_path / "hotfix"), run_id=child, tags={})
        bad = reg.register("s3://hotfixes/r-2/hotfix", run_id=None, tags=version_tags(make_report(ssim=0.3)))
        assert reg.promote(v.version).aliases == ["production"]
        with pytest.raises(PromotionRefused, match="SSIM 0.30 < 0.60"):
            reg.promote(bad.version)
        assert reg.serving().version == v.version
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the group this test started, by its id
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_version_dataclass_shape():
    v = Version("m", 3, "s3://x", None, {"passed": "true"}, [])
    assert v.passed and Version("m", 3, "s3://x", None, {"passed": "True"}, []).passed is False
