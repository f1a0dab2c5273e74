"""`ray-unlearn demo` closes its own deletion request: done with evidence when its hotfix is
promoted, failed with every trial's figures when nothing is; a later `requests process` never
claims it again. And the queue transitions that makes possible: `claim_ids`, `fail` with evidence."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from ray_unlearn.requests import LeaseLost, Queue, RequestError
from ray_unlearn.storage import LocalStore
from test_cli import cli, tiny_args
from test_requests import encode, picture


class Clock:
    def __init__(self):
        self.t = datetime(2025, 1, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        self.t += timedelta(microseconds=1)
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


# ---- the queue: claim by id ------------------------------------------------------------------------

def test_claim_ids_takes_only_the_named_claimable_requests(tmp_path):
    clock = Clock()
    q = Queue(LocalStore(tmp_path / "store"), lease_seconds=60, clock=clock)
    a, b, c = (q.submit(encode(picture(300 + i)))[0].id for i in range(3))
    (rec,) = q.claim_ids("demo", [b, b])  # duplicates are one claim
    assert rec.id == b and rec.state == "claimed" and rec.lease_holder == "demo" and rec.attempts == 1
    assert q.claim_ids("other", [b]) == []  # a live lease is not taken
    assert {r.id for r in q.claim("proc", 5)} == {a, c}  # the batch processor gets the others only
    clock.advance(61)
    (again,) = q.claim_ids("other", [b])  # an expired lease is retaken, fencing the old holder
    assert again.lease_holder == "other" and again.attempts == 2
    with pytest.raises(LeaseLost):
        q.complete(b, "demo", {"x": 1})
    q.complete(b, "other", {"x": 1})
    assert q.claim_ids("demo", [b]) == [] and q.get(b).state == "done"  # terminal: left as it is
    assert [e["event"] for e in q.ledger(b)] == ["submit", "claim", "claim", "complete"]
    with pytest.raises(RequestError, match="invalid request id"):
        q.claim_ids("demo", ["req-nothex"])
    with pytest.raises(RequestError, match="holder"):
        q.claim_ids("", [a])


def test_claim_ids_gives_up_like_claim(tmp_path):
    clock = Clock()
    q = Queue(LocalStore(tmp_path / "store"), lease_seconds=10, max_attempts=2, clock=clock)
    rid = q.submit(encode(picture(310)))[0].id
    for holder in ("a", "b"):
        assert len(q.claim_ids(holder, [rid])) == 1
        clock.advance(11)
    assert q.claim_ids("c", [rid]) == []
    assert q.get(rid).state == "failed" and q.ledger(rid)[-1]["event"] == "give_up"


def test_fail_keeps_its_figures_as_evidence(tmp_path):
    q = Queue(LocalStore(tmp_path / "store"))
    rid = q.submit(encode(picture(320)))[0].id
    q.claim_ids("demo", [rid])
    q.checkpoint(rid, "demo", {"stage": "searched"})
    rec = q.fail(rid, "demo", "not forgotten", {"last_attempt": {"sscd": 0.9}})
    assert rec.state == "failed" and rec.evidence == {"stage": "searched", "last_attempt": {"sscd": 0.9}}
    assert q.claim("proc", 5) == [] and q.ledger(rid)[-1]["record"]["evidence"]["last_attempt"] == {"sscd": 0.9}
    with pytest.raises(RequestError, match="JSON"):
        q2 = q.submit(encode(picture(321)))[0].id
        q.claim_ids("demo", [q2])
        q.fail(q2, "demo", "x", {"bad": object()})


# ---- the demo through the real CLI -----------------------------------------------------------------

SPACE = "method: surrogate\nspace:\n  train.lr: {loguniform: [5.0e-3, 2.0e-2]}\n  train.steps: {int: [2, 3]}\n"


def run_demo(tmp_path, model_dir, *sets: str) -> dict:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    args = [a for a in tiny_args(model_dir, tmp_path)]
    for s in sets:
        args += ["--set", s]
    res = cli("demo", "--trials", "2", "--space", space, "--out", tmp_path / "demo", "--json", *args)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])  # the summary is the last line


def show(tmp_path, rid: str) -> tuple[dict, str]:
    store = tmp_path / "demo" / "store"
    js = cli("requests", "show", rid, "--store", store, "--json", timeout=120)
    table = cli("requests", "show", rid, "--store", store, timeout=120)
    assert js.returncode == 0 and table.returncode == 0, js.stderr[-2000:] + table.stderr[-2000:]
    return json.loads(js.stdout), table.stdout


def process_claims_nothing(tmp_path, model_dir, rid: str) -> None:
    """A following `requests process` neither claims the demo's request nor changes its ledger."""
    before = show(tmp_path, rid)[0]["ledger"]
    res = cli("requests", "process", "--store", tmp_path / "demo" / "store", "--tracking-uri",
              f"sqlite:///{tmp_path / 'demo' / 'mlflow.db'}", "--json", *tiny_args(model_dir, tmp_path), timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["requests"] == [] and out["message"].startswith("no pending requests"), out
    assert show(tmp_path, rid)[0]["ledger"] == before


@pytest.mark.slow
def test_demo_completes_its_request_when_a_hotfix_is_promoted(tiny_model_dir, tmp_path):
    # gates relaxed so that a 2-step hotfix of the tiny model passes: this test is about the
    # request's end, not the method (a fixed threshold just under the base's own SSCD of 1)
    s = run_demo(tmp_path, tiny_model_dir, "eval.threshold=fixed", "eval.fixed_threshold=0.995",
                 "eval.min_integrity_ssim=0", "eval.max_collateral=1.0", "eval.specificity_percentile=null")
    assert s["promoted_version"] is not None, s
    chosen = s["chosen"]
    assert s["request_state"] == "done" and s["request_reason"] is None
    data, table = show(tmp_path, s["request"])
    rec, ledger = data["record"], data["ledger"]
    ev = rec["evidence"]
    assert rec["state"] == "done" and rec["lease_holder"] is None
    assert [e["event"] for e in ledger] == ["submit", "claim", "complete"] and ledger[1]["holder"].startswith("demo-")
    # the batch's keys, from the chosen trial
    assert ev["versions"]["new"] == s["promoted_version"] == chosen["version"] and ev["versions"]["parent"] == "base"
    assert ev["hotfix"] == chosen["hotfix"] and ev["trial"] == chosen["trial"] and ev["search"] == s["search"]
    assert ev["seed"] == 7 and ev["content_sha256"] == rec["content_sha256"]
    assert ev["threshold"]["value"] == pytest.approx(0.995) and ev["threshold"]["kind"] == "fixed"
    assert ev["sscd_new"] < ev["threshold"]["value"] <= ev["sscd_base"]
    assert ev["sscd_final"] == pytest.approx(chosen["sscd"]) and ev["artifact"] is False
    assert ev["integrity"]["ssim"] == pytest.approx(chosen["integrity"]) and ev["integrity"]["n"] == 4
    assert ev["settings"]["method"] == "surrogate" and ev["settings"]["params"] == chosen["params"]
    assert ev["settings"]["lr"] == pytest.approx(chosen["params"]["train.lr"])
    assert ev["descriptor"]["dim"] == 512 and len(ev["descriptor"]["b64"]) > 1000
    assert set(ev["times"]) == {"claimed_at", "started_at", "verified_at", "completed_at"}
    for key in ("sscd_base", "sscd_new", "threshold", "integrity", "descriptor", "versions", "hotfix", "settings"):
        assert key in table
    process_claims_nothing(tmp_path, tiny_model_dir, s["request"])


@pytest.mark.slow
def test_demo_fails_its_request_with_figures_when_nothing_is_promoted(tiny_model_dir, tmp_path):
    # a threshold no output gets under: no setting forgets it, nothing is chosen or promoted
    s = run_demo(tmp_path, tiny_model_dir, "eval.threshold=fixed", "eval.fixed_threshold=0.001")
    assert s["promoted_version"] is None and s["chosen"] is None and len(s["trials"]) == 2, s
    assert s["request_state"] == "failed" and "not forgotten within the gates" in s["request_reason"]
    data, table = show(tmp_path, s["request"])
    rec = data["record"]
    assert rec["state"] == "failed" and "SSCD" in rec["reason"] and "threshold 0.001" in rec["reason"]
    attempt = rec["evidence"]["last_attempt"]
    assert attempt["chosen_version"] is None and attempt["search"] == s["search"]
    assert sorted(t["version"] for t in attempt["trials"]) == sorted(p["version"] for p in s["trials"])
    for t in attempt["trials"]:
        assert t["sscd"] >= t["threshold"] == pytest.approx(0.001) and t["forgotten"] is False
        assert t["params"]["train.steps"] in (2, 3) and t["integrity"] is not None
    assert "last_attempt" in table
    assert [e["event"] for e in data["ledger"]] == ["submit", "claim", "fail"]
    process_claims_nothing(tmp_path, tiny_model_dir, s["request"])


def test_closest_trial_is_the_most_intact_that_forgot_else_the_nearest_to_forgetting():
    from ray_unlearn.platform.demo import _closest

    def trial(name, sscd, integrity, forgotten):
        return {"trial": name, "version": 1, "sscd": sscd, "integrity": integrity, "forgotten": forgotten,
                "passed": False, "threshold": 0.633, "collateral": 0.2}

    wrecked = trial("wrecked", 0.45, 0.50, False)  # lowest SSCD, but not specific and below the bound
    intact = trial("intact", 0.54, 0.83, True)
    summary = {"trials": [wrecked, intact, trial("other", 0.60, 0.70, True)], "min_integrity": 0.6}
    assert "trial intact" in _closest(summary)
    summary["trials"] = [wrecked, trial("far", 0.90, 0.95, False)]
    assert "trial wrecked" in _closest(summary)
