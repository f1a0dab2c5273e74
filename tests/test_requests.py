"""The deletion-request queue: the door check, claims under leases, crashes, the ledger, the CLI.

Local folder for everything; the S3 backend (a moto server on loopback) where it is cheap.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import uuid
import zlib
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ray_unlearn.requests import LeaseLost, Queue, RequestError, RequestNotFound
from ray_unlearn.requests.cli import requests_app
from ray_unlearn.storage import LocalStore, open_store
from conftest import BUCKET  # noqa: E402  (the moto_s3 S3 server fixture lives in conftest)


class Clock:
    def __init__(self):
        self.t = datetime(2025, 1, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        self.t += timedelta(microseconds=1)  # strictly increasing, like a real clock between calls
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def picture(seed: int = 0, size: int = 24) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


def png_header_only(w: int, h: int) -> bytes:
    """A valid PNG signature + IHDR claiming w x h, with a tiny IDAT: nothing that size is allocated."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture
def queue(store, clock):
    return Queue(store, lease_seconds=60, clock=clock)


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    request.getfixturevalue("moto_s3")
    return open_store(f"s3://{BUCKET}/q-{uuid.uuid4().hex[:8]}")


# ---- the door --------------------------------------------------------------------------------

def test_submit_stores_a_normalised_png_and_a_ledger_entry(queue, store):
    rec, created = queue.submit(encode(picture(1), "JPEG"), seed=42, note="my face <b>please</b>")
    assert created and rec.state == "pending" and rec.id.startswith("req-") and len(rec.id) == 20
    assert rec.id == "req-" + rec.content_sha256[:16] and rec.attempts == 0
    assert (rec.seed, rec.note, rec.mode, rec.source_format) == (42, "my face <b>please</b>", "RGB", "JPEG")
    stored = Image.open(io.BytesIO(queue.read_image(rec.id)))
    assert stored.format == "PNG" and stored.mode == "RGB" and stored.size == (24, 24)
    assert queue.get(rec.id) == rec
    (entry,) = queue.ledger(rec.id)
    assert (entry["event"], entry["from"], entry["to"], entry["seq"]) == ("submit", None, "pending", 1)


def test_same_picture_in_another_format_is_the_same_request(queue, tmp_path):
    path = tmp_path / "face.png"
    path.write_bytes(encode(picture(2)))
    first, created = queue.submit(path, note="first")
    again, created2 = queue.submit(encode(picture(2), "BMP"), note="second")
    assert created and not created2 and again.id == first.id and again.note == "first"
    assert len(queue.list()) == 1 and len(queue.ledger(first.id)) == 1


BAD_INPUTS = {
    "empty": (b"", "empty"),
    "corrupt bytes": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "truncated or corrupt"),
    "truncated png": (encode(picture(3))[:300], "truncated or corrupt"),
    "truncated jpeg": (encode(picture(3), "JPEG")[:400], "truncated or corrupt"),
    "text file": (b"name,face\nalice,yes\n", "not an image in an accepted format"),
    "gif": (encode(picture(3), "GIF"), "GIF images are not accepted"),
    "svg": (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG images are not accepted"),
    "huge header": (png_header_only(100_000, 100_000), "far more pixels than the limit of 40,000,000: send it smaller"),
    # between Pillow's warning (89.5 M) and error (179 M) limits: our one limit speaks, not Pillow's
    "pillow warning range": (png_header_only(10_000, 10_000), "^the image is 10000x10000 = 100,000,000 pixels; "
                             "the limit is 40,000,000: send it smaller$"),
    "over the limit": (png_header_only(7_000, 7_000), "49,000,000 pixels; the limit is 40,000,000"),
    "animated": (encode(picture(3), "WEBP", save_all=True, append_images=[picture(4)]), "2 frames"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_images_get_a_clear_error_and_store_nothing(queue, store, name):
    data, message = BAD_INPUTS[name]
    with pytest.raises(RequestError, match=message):
        queue.submit(data)
    assert store.list() == []


def test_size_limit_and_missing_file(store, clock, tmp_path):
    q = Queue(store, max_bytes=500, clock=clock)
    big = tmp_path / "big.png"
    big.write_bytes(encode(picture(5, size=64)))
    for image in (big, big.read_bytes()):
        with pytest.raises(RequestError, match="the limit is 500"):
            q.submit(image)
    with pytest.raises(RequestError, match="image not found"):
        q.submit(tmp_path / "nope.png")
    assert store.list() == []


def test_odd_modes_are_accepted_and_normalised(queue):
    grey16 = Image.fromarray((np.arange(24 * 24).reshape(24, 24) * 100).astype(np.uint16))
    palette_alpha = picture(6).convert("P")
    palette_alpha.info["transparency"] = 0
    cases = {
        "cmyk jpeg": (encode(picture(6).convert("CMYK"), "JPEG"), "RGB"),
        "palette png": (encode(picture(7).convert("P")), "RGB"),
        "palette with transparency": (encode(palette_alpha), "RGB"),
        "16-bit grey": (encode(grey16), "L"),
        "rgba": (encode(picture(8).convert("RGBA")), "RGB"),
        "grey + alpha": (encode(picture(9).convert("LA")), "L"),
        "1-bit": (encode(picture(10).convert("1")), "L"),
        "tiff": (encode(picture(11), "TIFF"), "RGB"),
        "webp": (encode(picture(12), "WEBP", lossless=True), "RGB"),
    }
    for name, (data, mode) in cases.items():
        rec, created = queue.submit(data)
        assert created and rec.mode == mode, name
        assert Image.open(io.BytesIO(queue.read_image(rec.id))).mode == mode, name
    rec = queue.list()[3]
    values = np.asarray(Image.open(io.BytesIO(queue.read_image(rec.id))))
    assert values.min() == 0 and values.max() > 200  # 16 bits scaled into 8, not clipped at 255


def test_exif_orientation_is_applied(queue):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    rec, _ = queue.submit(encode(picture(13).resize((40, 20)), "JPEG", exif=exif))
    assert (rec.width, rec.height) == (20, 40)


@pytest.mark.parametrize("note, message", [
    ("x" * 1001, "the limit is 1000"),
    ("hi \x1b[2J\x1b[31mowned", "control characters"),
    ("abc\u202etxt.exe", "control characters"),
    ("nul\x00", "control characters"),
])
def test_hostile_notes_are_refused(queue, store, note, message):
    with pytest.raises(RequestError, match=message):
        queue.submit(encode(picture(14)), note=note)
    assert store.list() == []


def test_plain_text_notes_and_bad_seeds(queue):
    note = "../../etc/passwd; rm -rf / <script>alert(1)</script>\n\tline 2 ✓"
    rec, _ = queue.submit(encode(picture(15)), note=note)
    assert queue.get(rec.id).note == note
    for seed in (-1, 2**64, "7", True):
        with pytest.raises(RequestError, match="seed"):
            queue.submit(encode(picture(16)), seed=seed)


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "req-../../../x", "req-0123456789abcdeG", "/abs", "",
                                    "req-0123456789abcdef/../../x", "REQ-0123456789ABCDEF"])
def test_hostile_ids_are_refused_before_touching_the_store(queue, bad_id, monkeypatch):
    monkeypatch.setattr(queue.store, "_list", lambda *a: pytest.fail("store accessed"))
    for call in (lambda: queue.get(bad_id), lambda: queue.ledger(bad_id), lambda: queue.purge_image(bad_id),
                 lambda: queue.read_image(bad_id), lambda: queue.complete(bad_id, "h", {}),
                 lambda: queue.mark_invalid(bad_id, "x")):
        with pytest.raises(RequestError, match="invalid request id"):
            call()


def test_unknown_id_is_not_found(queue):
    with pytest.raises(RequestNotFound, match="no request req-0123456789abcdef"):
        queue.get("req-0123456789abcdef")


# ---- claims and leases -----------------------------------------------------------------------

def test_concurrent_claims_never_share_a_request(any_store):
    setup = Queue(any_store)
    ids = {setup.submit(encode(picture(100 + i)))[0].id for i in range(6)}
    barrier, got = threading.Barrier(2), {}

    def processor(holder):
        q = Queue(any_store)  # its own instance, as another process would have
        barrier.wait()
        got[holder] = [r.id for r in q.claim(holder, limit=6)]

    threads = [threading.Thread(target=processor, args=(h,)) for h in ("proc-a", "proc-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a, b = set(got["proc-a"]), set(got["proc-b"])
    assert not a & b and a | b == ids
    for rid in ids:
        rec = setup.get(rid)
        assert rec.state == "claimed" and rec.attempts == 1
        assert rec.lease_holder == ("proc-a" if rid in a else "proc-b")
        assert [e["event"] for e in setup.ledger(rid)] == ["submit", "claim"]


def test_expired_lease_is_retaken_and_the_old_holder_is_fenced(store, clock):
    qa, qb = Queue(store, lease_seconds=60, clock=clock), Queue(store, lease_seconds=60, clock=clock)
    rid = qa.submit(encode(picture(20)))[0].id
    assert [r.id for r in qa.claim("a", 5)] == [rid]
    assert qb.claim("b", 5) == []  # lease still running
    clock.advance(30)
    qa.renew(rid, "a")
    clock.advance(45)
    assert qb.claim("b", 5) == []  # renewed: 60 s from the renewal
    clock.advance(30)
    (rec,) = qb.claim("b", 5)
    assert rec.lease_holder == "b" and rec.attempts == 2
    for late in (lambda: qa.complete(rid, "a", {"hotfix": "h-a"}), lambda: qa.renew(rid, "a"),
                 lambda: qa.fail(rid, "a", "oops"), lambda: qa.release(rid, "a"),
                 lambda: qa.checkpoint(rid, "a", {"x": 1})):
        with pytest.raises(LeaseLost, match="does not hold its lease"):
            late()
    done = qb.complete(rid, "b", {"hotfix": "h-b"})
    assert done.state == "done" and done.evidence == {"hotfix": "h-b"} and done.lease_holder is None
    assert [(e["event"], e["holder"]) for e in qa.ledger(rid)] == [
        ("submit", None), ("claim", "a"), ("renew", "a"), ("claim", "b"), ("complete", "b")]
    assert qa.claim("c", 5) == []


def test_non_holders_cannot_finish_a_request(queue):
    rid = queue.submit(encode(picture(21)))[0].id
    with pytest.raises(LeaseLost):
        queue.complete(rid, "a", {})  # pending: nobody holds it
    queue.claim("a", 1)
    with pytest.raises(LeaseLost):
        queue.complete(rid, "b", {})
    with pytest.raises(LeaseLost):
        queue.fail(rid, "b", "no")
    assert queue.get(rid).state == "claimed"


def test_expired_but_not_retaken_lease_still_completes(queue, clock):
    rid = queue.submit(encode(picture(22)))[0].id
    queue.claim("a", 1)
    clock.advance(3600)
    assert queue.complete(rid, "a", {"ok": True}).state == "done"


def test_release_fail_invalid_and_checkpoint(queue):
    r1, r2, r3 = (queue.submit(encode(picture(30 + i)))[0].id for i in range(3))
    assert {r.id for r in queue.claim("a", 3)} == {r1, r2, r3}
    queue.release(r1, "a")
    assert queue.get(r1).state == "pending" and queue.get(r1).lease_holder is None
    assert queue.fail(r2, "a", "the model does not produce it").reason == "the model does not produce it"
    queue.checkpoint(r3, "a", {"hotfix": "hf-1", "stage": "registering"})
    queue.mark_invalid(r3, "not a face")
    with pytest.raises(LeaseLost):
        queue.complete(r3, "a", {})  # an operator ended the lease
    assert queue.get(r3).evidence == {"hotfix": "hf-1", "stage": "registering"}
    assert [r.id for r in queue.claim("b", 5)] == [r1]  # failed and invalid are final
    queue.complete(r1, "b", {"hotfix": "hf-2"})
    with pytest.raises(RequestError, match="is done"):
        queue.mark_invalid(r1, "too late")
    assert {s: [r.id for r in queue.list(s)] for s in ("pending", "claimed", "done", "failed", "invalid")} == {
        "pending": [], "claimed": [], "done": [r1], "failed": [r2], "invalid": [r3]}
    with pytest.raises(RequestError, match="unknown state"):
        queue.list("bogus")
    with pytest.raises(RequestError, match="JSON"):
        queue.complete(r1, "b", {"x": object()})


def test_checkpoint_survives_a_crash_and_retake(queue, clock):
    rid = queue.submit(encode(picture(40)))[0].id
    queue.claim("a", 1)
    queue.checkpoint(rid, "a", {"hotfix": "hf-7"})
    clock.advance(61)  # 'a' dies here, after registering hf-7, before complete
    (rec,) = queue.claim("b", 1)
    assert rec.evidence == {"hotfix": "hf-7"}  # so 'b' completes with hf-7 instead of applying it again
    assert queue.complete(rid, "b", {"verified": True}).evidence == {"hotfix": "hf-7", "verified": True}


def test_repeatedly_abandoned_request_is_failed(store, clock):
    q = Queue(store, lease_seconds=10, max_attempts=2, clock=clock)
    rid = q.submit(encode(picture(41)))[0].id
    for holder in ("a", "b"):
        assert len(q.claim(holder, 1)) == 1
        clock.advance(11)
    assert q.claim("c", 1) == []
    rec = q.get(rid)
    assert rec.state == "failed" and "gave up after 2 claims" in rec.reason
    assert q.ledger(rid)[-1]["event"] == "give_up"


# ---- crashes between writes ------------------------------------------------------------------

def test_crash_before_first_event_leaves_no_request(queue, store):
    rec, _ = queue.submit(encode(picture(50)))
    store.delete(f"requests/{rec.id}/events/00000001.json")  # as if the submit died before its event
    assert queue.list() == [] and queue.claim("a", 5) == []
    again, created = queue.submit(encode(picture(50)))
    assert created and again.id == rec.id and [r.id for r in queue.claim("a", 5)] == [rec.id]


def test_crash_after_terminal_event_is_repaired_by_claim(queue, store):
    rid = queue.submit(encode(picture(51)))[0].id
    queue.claim("a", 1)
    queue.complete(rid, "a", {})
    store.put_bytes(f"requests/_open/{rid}", b"")  # the marker deletion never happened
    assert queue.claim("b", 5) == [] and not store.exists(f"requests/_open/{rid}")


def test_stale_writer_loses_to_the_newer_event(queue, store):
    rid = queue.submit(encode(picture(52)))[0].id
    queue.claim("a", 1)
    real_head = queue._head
    stale = real_head(rid)  # 'a' reads the request ...
    queue.release(rid, "a")  # ... meanwhile it is released and 'b' claims it (a slow 'a' thread, say)
    queue.claim("b", 1)
    calls = iter([stale])  # 'a' then acts on its old view once: its write must lose, not overwrite
    queue._head = lambda r: next(calls, None) or real_head(r)
    with pytest.raises(LeaseLost):
        queue.complete(rid, "a", {})
    assert queue.get(rid).lease_holder == "b"


# ---- purge, ledger ---------------------------------------------------------------------------

def test_purge_image_keeps_record_evidence_and_ledger(any_store):
    q = Queue(any_store)
    rid = q.submit(encode(picture(60)), note="n")[0].id
    with pytest.raises(RequestError, match="still needed"):
        q.purge_image(rid)
    q.claim("a", 1)
    q.complete(rid, "a", {"hotfix": "hf-9"})
    rec = q.purge_image(rid)
    assert rec.image_key is None and rec.evidence == {"hotfix": "hf-9"} and rec.state == "done"
    assert not any_store.exists(f"requests/{rid}/image.png")
    with pytest.raises(RequestError, match="purged"):
        q.read_image(rid)
    assert q.purge_image(rid).image_key is None  # idempotent
    again, created = q.submit(encode(picture(60)))
    assert not created and again.image_key is None and not any_store.exists(f"requests/{rid}/image.png")
    assert [e["event"] for e in q.ledger(rid)] == ["submit", "claim", "complete", "purge_image"]


def test_ledger_records_every_transition_in_order(queue):
    r1 = queue.submit(encode(picture(70)))[0].id
    r2 = queue.submit(encode(picture(71)))[0].id
    assert [r.id for r in queue.claim("a", 1)] == [r1]  # oldest first
    assert [r.id for r in queue.claim("a", 1)] == [r2]
    queue.fail(r2, "a", "bad")
    queue.complete(r1, "a", {})
    all_events = [(e["id"], e["event"], e["from"], e["to"]) for e in queue.ledger()]
    assert all_events == [(r1, "submit", None, "pending"), (r2, "submit", None, "pending"),
                          (r1, "claim", "pending", "claimed"), (r2, "claim", "pending", "claimed"),
                          (r2, "fail", "claimed", "failed"), (r1, "complete", "claimed", "done")]
    assert [e["seq"] for e in queue.ledger(r1)] == [1, 2, 3]
    assert all(e["record"]["id"] == e["id"] for e in queue.ledger())


# ---- CLI -------------------------------------------------------------------------------------

def test_cli_submit_list_show(tmp_path, monkeypatch):
    runner = CliRunner()
    monkeypatch.setenv("RAY_UNLEARN_STORE", str(tmp_path / "st"))
    img = tmp_path / "face.png"
    img.write_bytes(encode(picture(80)))
    res = runner.invoke(requests_app, ["submit", str(img), "--seed", "3", "--note", "please", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    rid = out["record"]["id"]
    assert out["created"] and out["record"]["seed"] == 3
    res = runner.invoke(requests_app, ["submit", str(img)])
    assert res.exit_code == 0 and f"already submitted as {rid}" in res.stdout
    res = runner.invoke(requests_app, ["list", "--state", "pending"])
    assert res.exit_code == 0 and rid in res.stdout and "please" in res.stdout
    assert json.loads(runner.invoke(requests_app, ["list", "--json"]).stdout)[0]["id"] == rid
    Queue(open_store(tmp_path / "st")).claim("proc", 1)
    res = runner.invoke(requests_app, ["show", rid])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert any("state" in line and "claimed" in line for line in lines), res.stdout
    assert any(" 2 " in line and "claim" in line and "pending -> claimed" in line and "proc" in line
               for line in lines), res.stdout
    shown = json.loads(runner.invoke(requests_app, ["show", rid, "--json"]).stdout)
    assert [e["event"] for e in shown["ledger"]] == ["submit", "claim"]
    res = runner.invoke(requests_app, ["mark-invalid", rid, "--reason", "duplicate person", "--store", str(tmp_path / "st")])
    assert res.exit_code == 0 and "invalid" in res.stdout
    res = runner.invoke(requests_app, ["purge-image", rid])
    assert res.exit_code == 0 and "purged" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["show", "../../etc/passwd"], "invalid request id"),
    (["show", "req-0123456789abcdef"], "no store at"),
    (["show", "req-0123456789abcdef\n"], "invalid request id"),
    (["list", "--state", "nope"], "unknown state"),
    (["submit", "missing.png"], "image not found"),
    (["submit", "notes.txt"], "not an image"),
    (["submit", "face.png", "--note", "\x1b[2Jhi"], "control characters"),
    (["list", "--store", "gs://b/x"], "unsupported store URI"),
])
def test_cli_errors_exit_2_without_traceback(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "face.png").write_bytes(encode(picture(81)))
    monkeypatch.delenv("RAY_UNLEARN_STORE", raising=False)
    res = CliRunner().invoke(requests_app, args)
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and message in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "ray_unlearn_store").exists()  # nothing stored, not even a folder


def test_cli_on_s3(moto_s3, tmp_path):  # noqa: F811
    uri = f"s3://{BUCKET}/cli-{uuid.uuid4().hex[:8]}"
    img = tmp_path / "face.jpg"
    img.write_bytes(encode(picture(90), "JPEG"))
    runner = CliRunner()
    res = runner.invoke(requests_app, ["submit", str(img), "--store", uri, "--json"])
    assert res.exit_code == 0, res.output
    rid = json.loads(res.stdout)["record"]["id"]
    res = runner.invoke(requests_app, ["show", rid, "--store", uri])
    assert res.exit_code == 0 and "- -> pending" in res.stdout and "submit" in res.stdout, res.output
