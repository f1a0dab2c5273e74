"""Issue 10, "hardening the request path": each failure found by a hostile user or an unlucky
operator, reproduced through the real CLI where a user would hit it.

1 a picture the model never produced; 2 a killed batch's scratch (requesters' pictures) left in
the temp directory; 3 --max-attempts 0 and no way to requeue; 4 divergence; 6 exit codes; 7 stuck
leases are silent; 8 killed batches' MLflow runs stay RUNNING; 9 the door's small ones. (5, the
S3 error messages, is in tests/test_storage.py's style at the end of this file.)
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from ray_unlearn.exit_codes import ExitCode
from ray_unlearn.requests import Queue
from ray_unlearn.requests.cli import requests_app
from ray_unlearn.storage import open_store
from test_process import REPO, png, registry, tiny_config, wait_for  # noqa: E402 (tests/ is on sys.path)

RUNNER = CliRunner()


def cli(*args: str):
    return RUNNER.invoke(requests_app, list(args))


def grey_1x1(path: Path) -> Path:
    Image.new("L", (1, 1), 128).save(path)
    return path


def set_config(path: Path, **sections) -> Path:
    raw = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        raw[section].update(values)
    path.write_text(yaml.safe_dump(raw))
    return path


# ---- 1: "produced by the model" is checked before anything is trained ----------------------------

def test_a_picture_the_model_never_produced_is_not_trained_on_and_ends_not_produced(tiny_model_dir, tmp_path):
    store, uri = str(tmp_path / "store"), f"sqlite:///{tmp_path}/mlflow.db"
    cfg = set_config(tiny_config(tiny_model_dir, tmp_path), eval={"fixed_threshold": 0.6})
    grey = grey_1x1(tmp_path / "grey.png")
    rid = json.loads(cli("submit", str(grey), "--seed", "1", "--store", store, "--json").stdout)["record"]["id"]
    common = ["--store", store, "--config", str(cfg), "--tracking-uri", uri, "--model", "np"]

    res = cli("process", *common, "--json")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert res.exit_code == ExitCode.REQUEST_FAILED, res.output
    [result] = out["requests"]
    assert result["result"] == "not_produced" and "does not generate this image" in result["reason"], result
    rec = Queue(open_store(store)).get(rid)
    e = rec.evidence
    assert rec.state == "not_produced" and e["sscd_base"] < e["threshold"]["value"] == 0.6
    assert "train_seconds" not in e and "descriptor" not in e  # nothing trained on it
    assert registry(uri, "np").versions() == [] and out["batch"] is not None  # checked in a batch; nothing shipped
    shown = cli("list", "--store", store, "--state", "not_produced")
    assert rid in shown.stdout and "nothing to remove" in shown.stdout

    # the operator's override, on the record
    res = cli("requeue", rid, "--reason", "legal insists", "--train-anyway", "--store", store)
    assert res.exit_code == 0 and "override" in res.stdout, res.output
    res = cli("process", *common, "--json")
    assert res.exit_code == 0, res.output
    rec = Queue(open_store(store)).get(rid)
    assert rec.state == "done" and rec.produced_override == "legal insists"
    assert rec.evidence["produced_override"]["override"] == "legal insists"
    assert [e["event"] for e in Queue(open_store(store)).ledger(rid)].count("requeue") == 1


# ---- 2, 7, 8: a SIGKILLed batch leaves no picture, no silent lease, no RUNNING run ----------------

def _files_containing(root: Path, needles: list[bytes]) -> list[Path]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            if any(n in data for n in needles):
                hits.append(p)
    return hits


@pytest.mark.slow
def test_a_killed_batch_leaves_no_picture_in_the_temp_root_and_its_run_ends_killed(tiny_model_dir, tmp_path):
    from mlflow import MlflowClient

    tmp_root, store, uri = tmp_path / "tmp", tmp_path / "store", f"sqlite:///{tmp_path}/mlflow.db"
    tmp_root.mkdir()
    cfg = set_config(tiny_config(tiny_model_dir, tmp_path), train={"steps": 400})  # long enough to be killed in
    picture = png(5, size=16)
    (tmp_path / "face.png").write_bytes(picture)
    assert cli("submit", str(tmp_path / "face.png"), "--seed", "5", "--store", str(store)).exit_code == 0
    stored = Queue(open_store(store)).read_image(Queue(open_store(store)).list()[0].id)
    env = {**os.environ, "TMPDIR": str(tmp_root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "ray_unlearn.cli", "requests", "process", "--store", str(store), "--config",
            str(cfg), "--tracking-uri", uri, "--model", "killed", "--train-unproduced"]
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:  # killed while the picture is in its scratch, mid-training
        wait_for(lambda: _files_containing(tmp_root, [stored]), "the batch to write the picture to its scratch",
                 timeout=300)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert _files_containing(tmp_root, [stored]), "the kill left nothing behind: the test proves nothing"
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("ray-unlearn-requests")
                                          .experiment_id])
    assert [r.info.status for r in runs] == ["RUNNING"]

    # 7: the stuck lease is shown, not silent
    listed = cli("list", "--store", str(store))
    assert "claimed" in listed.stdout and "until" in listed.stdout and "UTC" in listed.stdout, listed.output
    nxt = subprocess.run(argv + ["--json"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert nxt.returncode == 0, nxt.stderr[-3000:]
    out = json.loads(nxt.stdout.strip().splitlines()[-1])
    assert "1 request(s) are claimed by" in out["message"] and "whose lease expires at" in out["message"]
    assert out["claimed_elsewhere"][0]["n"] == 1

    # 2: no file with the picture's bytes (stored PNG or the submitted file) anywhere under the temp root
    assert _files_containing(tmp_root, [stored, picture]) == []
    assert not list(tmp_root.glob("ray-unlearn-batch-*"))
    # 8: the dead batch's run ended KILLED, saying why
    run = MlflowClient(uri).get_run(runs[0].info.run_id)
    assert run.info.status == "KILLED" and "died" in run.data.tags["ended_because"]


def test_scratch_of_a_live_batch_is_not_swept(tmp_path):
    from ray_unlearn.requests.scratch import Scratch, sweep

    with Scratch("me", tmp_path) as live:
        (live / "req.png").write_bytes(b"pixels")
        assert sweep(tmp_path) == [] and (live / "req.png").exists()
    assert not live.exists()  # removed on the way out


# ---- 3: options and requeue -----------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--max-attempts", "0"], "--max-attempts must be at least 1"),
    (["--lease-seconds", "10", "--renew-seconds", "10"], "must be longer than the renewal period"),
    (["--lease-seconds", "0"], "must be positive"),
])
def test_bad_processor_options_exit_2_before_touching_a_request(tmp_path, args, message):
    store = tmp_path / "store"
    Queue(open_store(store)).submit(png(1), seed=1)
    res = cli("process", "--store", str(store), "--tracking-uri", f"sqlite:///{tmp_path}/m.db", *args)
    assert res.exit_code == ExitCode.USAGE and message in res.stderr, res.output
    assert Queue(open_store(store)).list()[0].state == "pending"


def test_a_failed_request_can_be_requeued_on_the_ledger(tmp_path):
    store = tmp_path / "store"
    q = Queue(open_store(store))
    rid = q.submit(png(2), seed=2)[0].id
    q.claim("proc", 1)
    q.fail(rid, "proc", "not forgotten with these settings")
    res = cli("submit", str(_write(tmp_path / "again.png", png(2))), "--store", str(store))
    assert "state: failed" in res.stdout and f"requests requeue {rid}" in res.stdout
    assert cli("requeue", rid, "--store", str(store)).exit_code == ExitCode.USAGE  # --reason is required
    res = cli("requeue", rid, "--reason", "retry with lr 1e-5", "--store", str(store))
    assert res.exit_code == 0 and "pending" in res.stdout, res.output
    rec = q.get(rid)
    assert rec.state == "pending" and rec.attempts == 0 and rec.produced_override is None
    assert q.ledger(rid)[-1]["event"] == "requeue" and q.ledger(rid)[-1]["reason"] == "retry with lr 1e-5"
    assert [r.id for r in q.claim("proc2", 1)] == [rid]  # back in the open index
    res = cli("requeue", rid, "--reason", "again", "--store", str(store))
    assert res.exit_code == ExitCode.USAGE and "only failed or not_produced" in res.stderr


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---- 4: divergence --------------------------------------------------------------------------------

def test_the_loop_stops_at_the_first_non_finite_loss_naming_step_and_settings(tiny_model_dir, tmp_path):
    from ray_unlearn import engine
    from ray_unlearn.config import TargetSpec, load_config
    from ray_unlearn.loop import DivergedError

    cfg = set_config(tiny_config(tiny_model_dir, tmp_path), train={"lr": 1000.0, "steps": 6})
    cfg = load_config(cfg).model_copy(update={"targets": [TargetSpec(seed=3)]})
    prep = engine.prepare(cfg, engine.load_family(cfg))
    with pytest.raises(DivergedError) as err:
        engine.train(prep, progress=False)
    e = err.value
    assert 1 <= e.step <= 6 and f"diverged (NaN at step {e.step})" in str(e) and "lr 1000.0" in str(e)
    assert all(torch.isfinite(p).all() for p in prep.family.trainable_parameters())  # stopped before applying it


def test_a_diverged_request_fails_naming_nan_and_ships_nothing(tiny_model_dir, tmp_path):
    store, uri = str(tmp_path / "store"), f"sqlite:///{tmp_path}/mlflow.db"
    cfg = set_config(tiny_config(tiny_model_dir, tmp_path), train={"lr": 1000.0, "steps": 6})
    rid = Queue(open_store(store)).submit(png(4), seed=4)[0].id
    res = cli("process", "--store", store, "--config", str(cfg), "--tracking-uri", uri, "--model", "nan",
              "--train-unproduced", "--json")
    assert res.exit_code == ExitCode.REQUEST_FAILED, res.output
    rec = Queue(open_store(store)).get(rid)
    assert rec.state == "failed" and rec.reason.startswith("diverged (NaN at step ") and "threshold" not in rec.reason
    assert registry(uri, "nan").versions() == [] and not (Path(store) / "hotfixes").exists()


def test_evaluation_refuses_non_finite_images(tiny_model_dir, tmp_path):
    from ray_unlearn import engine
    from ray_unlearn import evaluate as ev
    from ray_unlearn.config import load_config

    cfg = load_config(tiny_config(tiny_model_dir, tmp_path))
    ok = torch.rand(2, 1, 16, 16)
    bad = ok.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="integrity new samples contain non-finite pixels"):
        ev.evaluate_outputs(cfg.eval, engine.build_metrics(cfg), [], ok[:0], ok[:0], ok, bad, ok)


# ---- 6: exit codes --------------------------------------------------------------------------------

def test_exit_codes_0_idle_and_3_a_gate_refused(tiny_model_dir, tmp_path):
    store, uri = str(tmp_path / "store"), f"sqlite:///{tmp_path}/mlflow.db"
    cfg = set_config(tiny_config(tiny_model_dir, tmp_path), train={"lr": 1e-2, "steps": 4},
                     eval={"min_integrity_ssim": 0.9999})
    common = ["--store", store, "--config", str(cfg), "--tracking-uri", uri, "--model", "codes", "--train-unproduced"]
    Path(store).mkdir()
    assert cli("process", *common).exit_code == ExitCode.OK  # nothing to do
    Queue(open_store(store)).submit(png(6), seed=6)
    res = cli("process", *common, "--json")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert res.exit_code == ExitCode.GATE_REFUSED and "integrity gate" in out["requests"][0]["reason"], res.output


def test_exit_code_4_when_the_store_is_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_UNLEARN_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    res = cli("list", "--store", "s3://nowhere/requests")
    assert res.exit_code == ExitCode.INFRASTRUCTURE and "Traceback" not in res.output, res.output
    assert res.stderr.startswith("error: ")


def test_exit_code_table_is_documented():
    doc = (REPO / "docs" / "requests.md").read_text()
    for code in ExitCode:
        assert f"| {int(code)} | `{code.name}` |" in doc, code


# ---- 9: the door ----------------------------------------------------------------------------------

def test_the_door_small_ones(tmp_path):
    store = str(tmp_path / "store")
    # a directory gets its own message
    res = cli("submit", str(tmp_path), "--store", store)
    assert res.exit_code == ExitCode.USAGE and "is a directory" in res.stderr, res.output
    # an oversized picture is downscaled at the door; the original's hash is recorded
    big = tmp_path / "big.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (600, 900, 3), dtype=np.uint8)).save(big)
    res = cli("submit", str(big), "--max-side", "32", "--store", store, "--json")
    rec = json.loads(res.stdout)["record"]
    assert (rec["width"], rec["height"]) == (32, 21) and rec["original_size"] == [900, 600], res.output
    assert rec["original_sha256"] and rec["original_sha256"] != rec["content_sha256"]
    stored = Image.open(io.BytesIO(Queue(open_store(store)).read_image(rec["id"])))
    assert stored.size == (32, 21)
    # a duplicate with another seed or note says what was kept
    res = cli("submit", str(big), "--max-side", "32", "--seed", "9", "--note", "second", "--store", store)
    assert "kept the first submission's seed None (this one gave 9)" in res.stdout, res.output
    assert "this one's was not stored" in res.stdout
    # an id with a trailing newline is refused
    res = cli("show", rec["id"] + "\n", "--store", store)
    assert res.exit_code == ExitCode.USAGE and "invalid request id" in res.stderr
    # a store that does not exist is not an empty queue
    res = cli("list", "--store", str(tmp_path / "typo"))
    assert res.exit_code == ExitCode.USAGE and "no store at" in res.stderr and "does not exist" in res.stderr
    assert not (tmp_path / "typo").exists()


# ---- issue 9: the request layer imports no Ray, and no module of it imports itself through a cycle ----

def _imports(path: Path) -> list[str]:
    """Every import, late ones (inside functions) included; not those under `if TYPE_CHECKING:`,
    which never run."""
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
    return out


def test_the_request_layer_never_imports_ray_and_has_no_import_cycle():
    pkg = REPO / "ray_unlearn" / "requests"
    graph = {f"ray_unlearn.requests.{p.stem}": [m for m in _imports(p) if m.startswith("ray_unlearn.requests.")]
             for p in pkg.glob("*.py") if p.stem != "__init__"}
    for p in pkg.glob("*.py"):
        assert not [m for m in _imports(p) if m == "ray" or m.startswith("ray.")], p
    # no cycle among the modules (each edge an import, at load time or late)
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph.get(node, []):
            assert state.get(nxt) != 1, " -> ".join([*stack, node, nxt])
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


# ---- 5: storage errors say what happened ----------------------------------------------------------

class _Refuses:
    """An S3 client that answers every call with one error code (as a bucket policy or IAM would)."""

    def __init__(self, code: str, status: int = 403):
        self.code, self.status = code, status

    def __getattr__(self, name):
        from botocore.exceptions import ClientError

        def call(**kw):
            raise ClientError({"Error": {"Code": self.code, "Message": "refused"},
                               "ResponseMetadata": {"HTTPStatusCode": self.status}}, name)
        return call


def test_a_missing_bucket_is_named_and_the_cli_exits_4(moto_s3):
    res = cli("list", "--store", "s3://no-such-bucket-here/requests")
    assert res.exit_code == ExitCode.INFRASTRUCTURE, res.output
    assert "bucket 'no-such-bucket-here' does not exist" in res.stderr and "s3://no-such-bucket-here" in res.stderr
    assert "storage key" not in res.stderr  # not mislabelled as a bad key (the listed prefix ends in '/')


@pytest.mark.parametrize("code", ["AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"])
def test_access_denied_is_named_with_the_fix(code):
    from ray_unlearn.storage import StorageError
    from ray_unlearn.storage.s3 import S3Store

    q = Queue(S3Store("bucket", "unlearn", client=_Refuses(code)))
    with pytest.raises(StorageError) as err:
        q.list()
    msg = str(err.value)
    assert "access denied" in msg and "s3://bucket/unlearn" in msg and "credentials" in msg and code in msg, msg


def test_an_unreachable_endpoint_is_named(monkeypatch):
    from ray_unlearn.storage import StorageError, open_store as open_

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError) as err:
        Queue(open_(("s3://b/p"), endpoint_url="http://127.0.0.1:9")).list()
    msg = str(err.value)
    assert "cannot reach the S3 endpoint http://127.0.0.1:9" in msg and "storage key" not in msg, msg
