"""The continual benchmark (`jobs/benchmark.py --continual`): drawn seeds, every one recorded per
strategy, failures with their figures, resuming without redoing a request, and its outputs."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from ray_unlearn.bench.continual import (
    CONTINUAL_RNG_SEED, SEED_POOL, STRATEGIES, check_strategies, continual_seeds, heatmap_matrix, heatmaps,
    integrity_plot, load_rows, render_markdown, render_single, save_rows, summarize, summarize_single,
)

REPO = Path(__file__).resolve().parents[1]


def test_seeds_are_the_fixed_rngs_draws_and_a_longer_run_extends_a_shorter_one():
    twenty = continual_seeds(20)
    assert twenty == random.Random(CONTINUAL_RNG_SEED).sample(SEED_POOL, 20)  # the documented draw, none skipped
    assert continual_seeds(3) == twenty[:3] and len(set(twenty)) == 20
    assert all(100 <= s < 1_000_000 for s in twenty) and not {7, 11, 5, 4} & set(twenty)
    with pytest.raises(ValueError, match="at least one request"):
        continual_seeds(0)
    tuning = continual_seeds(3, rng_seed=1107)  # --rng-seed: a tuning run never draws the benchmark's seeds
    assert tuning == random.Random(1107).sample(SEED_POOL, 3) and not set(tuning) & set(twenty)


def test_strategies_are_checked_before_anything_runs():
    assert check_strategies(["sequential", "merge"]) == ["sequential", "merge"]
    with pytest.raises(ValueError, match="unknown strategy 'greedy'"):
        check_strategies(["sequential", "greedy"])
    with pytest.raises(ValueError, match="named twice"):
        check_strategies(["joint", "joint"])


def _ver(rid, sscd, thr=0.6):
    return {"id": rid, "sscd": sscd, "threshold": thr, "forgotten": sscd < thr, "artifact": False, "why": None}


def _rows() -> list[dict]:
    """Three requests: done (v1), failed by a gate (model unchanged, its figures kept), done (v2),
    on which request 1 came back."""
    r1 = {"i": 1, "seed": 11, "request_id": "req-a", "result": "done", "reason": None, "version": 1, "new_version": True,
          "request": {"sscd_base": 0.95, "sscd_new": 0.40, "integrity_ssim": 0.8}, "model": {"ssim": 0.8, "fid": 40.0},
          "reverified": [_ver("req-a", 0.40)], "n_done": 1, "n_forgotten": 1, "wall_seconds": 10.0,
          "train_seconds": 4.0}
    r2 = {"i": 2, "seed": 22, "request_id": "req-b", "result": "failed", "version": 1, "new_version": False,
          "reason": "integrity gate: unlearning it would leave SSIM 0.510 against the base, below the bound 0.6",
          "request": {"sscd_base": 0.97, "sscd_new": 0.30, "integrity_ssim": 0.51}, "model": {"ssim": 0.8, "fid": 40.0},
          "reverified": [_ver("req-a", 0.40)], "n_done": 1, "n_forgotten": 1, "wall_seconds": 9.0, "train_seconds": None}
    r3 = {"i": 3, "seed": 33, "request_id": "req-c", "result": "done", "reason": None, "version": 2, "new_version": True,
          "request": {"sscd_base": 0.9, "sscd_new": 0.5, "integrity_ssim": 0.7}, "model": {"ssim": 0.7, "fid": 70.0},
          "reverified": [_ver("req-a", 0.66), _ver("req-c", 0.5)], "n_done": 2, "n_forgotten": 1,
          "wall_seconds": 12.0, "train_seconds": 6.0}
    return [r1, r2, r3]


def test_summary_counts_every_request_and_judges_the_final_model():
    m = summarize(_rows(), n_planned=4)
    assert (m["recorded"], m["done"], m["failed"], m["not_produced"]) == (3, 2, 1, 0)
    assert m["final_ssim"] == pytest.approx(0.7) and m["final_fid"] == 70.0 and m["fid_ratio"] == pytest.approx(1.75)
    assert m["still_forgotten"] == 1 and m["all_done_forgotten"] is False  # request 1 came back on v2
    assert m["train_window"] == 1 and m["train_ratio"] == pytest.approx(1.5)
    assert m["targets"] == {"all_done": False, "all_forgotten_on_final": False, "final_ssim>=0.7": True,
                            "fid_ratio<=1.5": False}
    assert summarize(_rows()[:1], 1)["targets"]["all_forgotten_on_final"] is True
    assert summarize(_rows()[:2], 2)["final_ssim"] == pytest.approx(0.8)  # a failed request leaves the model
    assert summarize([], 3)["final_ssim"] is None
    refused_first = [{**_rows()[1], "i": 1, "version": None, "model": None, "reverified": []},
                     *[{**r, "version": r["version"] - 1} for r in _rows()[2:]]]
    m = summarize(refused_first, 2)  # the first version, made on the base after a refusal, is the single request
    assert m["fid_first"] == 70.0 and m["fid_ratio"] == pytest.approx(1.0) and m["done"] == 1


def test_table_lists_every_drawn_seed_failures_with_their_figures_and_runs_not_made():
    rows = _rows()
    md = render_markdown([11, 22, 33, 44], {"sequential": rows}, {"sequential": summarize(rows, 4)}, ["train.steps=2"])
    assert "| 2 | 22 | failed: integrity gate: unlearning it would leave SSIM 0.510" in md
    assert "0.970 -> 0.300, SSIM 0.510" in md  # the failed request's own figures
    assert "| 4 | 44 | not run |" in md and "| sequential | 3/4 | 2 | 1 | 0 | 0.700 | 70.0 | 1.75 | no (1/2) |" in md
    assert f"random.Random({CONTINUAL_RNG_SEED})" in md and "train.steps=2" in md


def test_summary_prints_as_a_rich_table(capsys):
    from ray_unlearn.bench.continual import print_summary

    print_summary({"anchored": summarize(_rows(), 4)})
    print_summary({"anchored": summarize_single(_rows(), 8)}, single=True)
    out = capsys.readouterr().out
    assert "anchored" in out and "no (1/2)" in out and "4.0 -> 6.0" in out and "0.670" in out


def test_single_requests_count_a_refused_hotfixs_integrity_too():
    rows = _rows()  # here: three seeds, each alone on the base (the failed one's SSIM is its refused hotfix's)
    m = summarize_single(rows, 8)
    assert (m["done"], m["failed"], m["n_ssim"]) == (2, 1, 3)
    assert m["mean_ssim"] == pytest.approx((0.8 + 0.51 + 0.7) / 3) and m["min_ssim"] == 0.51 and m["below_bound"] == 1
    assert m["targets"] == {"n>=8": False, "every_target_forgotten": False, "mean_ssim>=0.75": False,
                            "none_below_0.6": False}
    md = render_single([11, 22, 33, 44], {"anchored": rows}, {"anchored": m}, [])
    assert "| 2 | 22 | ✗ failed SSCD 0.970 -> 0.300, SSIM 0.510 (integrity gate" in md and "| 4 | 44 | not run |" in md
    assert "| anchored | 3/8 | 2 | 1 | 0 | 0.670 | 0.510 | 1/3 |" in md


def test_heat_map_is_requests_by_versions_from_each_requests_own_version_on():
    labels, versions, m = heatmap_matrix(_rows())
    assert labels == ["#1 seed 11", "#3 seed 33"] and versions == [1, 2]  # the failed request made no version
    assert m[0] == [pytest.approx(0.4 / 0.6), pytest.approx(0.66 / 0.6)]
    assert math.isnan(m[1][0]) and m[1][1] == pytest.approx(0.5 / 0.6)


def test_pictures_are_written_for_runs_with_and_without_versions(tmp_path):
    from PIL import Image

    none = [{**_rows()[1], "i": 1, "version": None, "model": None, "reverified": []}]
    runs = {"sequential": _rows(), "anchored": none}
    integrity_plot(tmp_path / "i.png", runs, 0.6)
    heatmaps(tmp_path / "h.png", runs)
    for name in ("i.png", "h.png"):
        w, h = Image.open(tmp_path / name).size
        assert w > 300 and h > 200
    assert Image.open(tmp_path / "h.png").size[0] > Image.open(tmp_path / "h.png").size[1]  # a panel per strategy


def test_rows_resume_only_with_the_settings_they_were_made_with(tmp_path):
    path = tmp_path / "s" / "rows.json"
    assert load_rows(path, ["a=1"]) == []
    save_rows(path, "sequential", _rows(), ["a=1"])
    assert [r["seed"] for r in load_rows(path, ["a=1"])] == [11, 22, 33]
    with pytest.raises(ValueError, match="same --set values"):
        load_rows(path, ["a=2"])
    assert not list(path.parent.glob("*.tmp"))


def test_a_config_without_the_strategy_setting_runs_only_sequential(monkeypatch):
    from ray_unlearn.config import ConfigError
    from ray_unlearn.platform import continual

    real = continual.load_config

    def old_config(path, overrides=(), **kw):
        if any(o.startswith("continual.") for o in overrides):
            raise ConfigError("continual: Extra inputs are not permitted")
        return real(path, overrides, **kw)

    monkeypatch.setattr(continual, "load_config", old_config)
    assert continual.strategy_overrides("sequential", ("train.steps=3",)) == ["train.steps=3"]
    with pytest.raises(ConfigError, match="--strategies sequential"):
        continual.strategy_overrides("anchored")
    monkeypatch.setattr(continual, "load_config", real)
    with pytest.raises(ConfigError, match="train.stepz|stepz"):
        continual.strategy_overrides("sequential", ("train.stepz=3",))  # other errors are not hidden


def test_budget_starts_no_request_and_the_table_says_not_run(tmp_path):
    from ray_unlearn.platform.continual import ContinualOptions, run_continual

    res = run_continual(ContinualOptions(n_requests=2, strategies=["sequential"], tiny=True, out=tmp_path / "o",
                                         progress=False, budget_s=0.0))
    assert res["runs"] == {"sequential": []} and res["seeds"] == continual_seeds(2)
    md = (tmp_path / "o" / "continual.md").read_text()
    assert all(f"| {i} | {s} | not run |" in md for i, s in enumerate(continual_seeds(2), 1))
    assert sorted(p.name for p in (tmp_path / "o" / "requests").glob("seed-*.png")) == sorted(
        f"seed-{s}.png" for s in continual_seeds(2))  # what a requester would send, rendered by `sample`'s code
    with pytest.raises(ValueError, match="new --out"):  # never another model's pictures
        run_continual(ContinualOptions(n_requests=2, strategies=["sequential"], tiny=True, out=tmp_path / "o",
                                       progress=False, budget_s=0.0, sets=("sampler.steps=3",)))
    tuning = run_continual(ContinualOptions(n_requests=2, strategies=["sequential"], tiny=True, out=tmp_path / "t",
                                            progress=False, budget_s=0.0, rng_seed=1107))
    assert tuning["seeds"] == continual_seeds(2, 1107) and tuning["rng_seed"] == 1107
    assert "random.Random(1107)" in (tmp_path / "t" / "continual.md").read_text()


def test_a_request_a_stopped_run_was_processing_is_tried_again_not_given_up(tmp_path):
    """A run stopped mid-request leaves it claimed: the resumed run waits out the lease and gives it
    its one try (the stopped run's claim was none), instead of failing it unseen."""
    from ray_unlearn.platform.continual import ContinualOptions, _paths, run_continual
    from ray_unlearn.requests.queue import Queue
    from ray_unlearn.storage import open_store

    out = tmp_path / "o"
    opts = dict(n_requests=1, strategies=["sequential"], tiny=True, out=out, progress=False)
    run_continual(ContinualOptions(**opts, budget_s=0.0))  # renders the request's picture, runs nothing
    seed = continual_seeds(1)[0]
    queue = Queue(open_store(_paths(out, "sequential")["store"]), lease_seconds=1.0)
    rec, _ = queue.submit(out / "requests" / f"seed-{seed}.png", seed=seed)
    assert [r.id for r in queue.claim("stopped-run", 1)] == [rec.id]  # the stopped run's claim, left behind

    row = run_continual(ContinualOptions(**opts))["runs"]["sequential"][0]
    assert row["request_id"] == rec.id and "gave up" not in (row["reason"] or ""), row
    assert row["result"] in ("done", "failed") and row["request"]["sscd_new"] is not None, row  # it was tried
    assert row["statuses"] and row["statuses"][0] != "idle", row


@pytest.mark.slow
def test_tiny_benchmark_records_every_seed_per_strategy_resumes_and_keeps_failures(tmp_path, monkeypatch):
    from ray_unlearn.platform import continual

    out = tmp_path / "bench"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(REPO / "jobs" / "benchmark.py"), "--continual", "--tiny", "--out", str(out),
                        "--json"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "continual.json").read_text())
    seeds = continual_seeds(3)
    strategies = list(STRATEGIES[:2])
    assert res["seeds"] == seeds and list(res["runs"]) == strategies
    for s in strategies:
        rows = res["runs"][s]
        assert [r["seed"] for r in rows] == seeds  # every drawn seed, in order, none dropped
        for row in rows:
            assert row["result"] in ("done", "failed", "not_produced") and row["wall_seconds"] > 0
            assert row["request"]["sscd_base"] is not None  # figures, whatever the result
            if row["result"] == "done":
                assert row["new_version"] and row["model"]["ssim"] is not None
                assert row["n_done"] == len(row["reverified"])  # every done request re-verified on the new version
            else:
                assert row["reason"]
        versions = [row["version"] for row in rows if row["new_version"]]
        assert versions == list(range(1, len(versions) + 1))  # one batch, one version per request that passed
    for name in ("continual.md", "integrity.png", "heatmap.png", "sequential/rows.json"):
        assert (out / name).is_file(), name

    # a second call resumes: nothing is redone
    def no_rerun(*a, **k):
        raise AssertionError("a recorded request was run again")

    monkeypatch.setattr(continual, "run_request", no_rerun)
    again = continual.run_continual(continual.ContinualOptions(n_requests=3, strategies=strategies, tiny=True, out=out,
                                                               progress=False))
    assert again["runs"] == res["runs"]
    monkeypatch.undo()

    # single requests: each seed alone on the base model, so each done one is version 1 of its own registry
    single = continual.run_continual(continual.ContinualOptions(
        n_requests=2, strategies=["sequential"], tiny=True, single=True, out=out, progress=False))
    rows = single["runs"]["sequential"]
    assert [r["seed"] for r in rows] == seeds[:2] and (out / "single.md").is_file()
    assert all(r["version"] == (1 if r["result"] == "done" else None) and r["n_done"] <= 1 for r in rows)
    first = res["runs"]["sequential"][0]["request"]  # request 1 of a run is a single request on the same base
    assert {k: pytest.approx(v, abs=0.02) for k, v in first.items() if v is not None} == {
        k: v for k, v in rows[0]["request"].items() if v is not None}

    # a request the gates refuse is recorded failed, with its figures, and the model is unchanged
    bad = continual.run_continual(continual.ContinualOptions(
        n_requests=1, strategies=["sequential"], tiny=True, out=tmp_path / "bad", progress=False,
        sets=("eval.min_integrity_ssim=1.0",)))
    row = bad["runs"]["sequential"][0]
    assert row["result"] == "failed" and "integrity gate" in row["reason"], row
    assert row["request"]["integrity_ssim"] < 1.0 and row["request"]["sscd_new"] is not None
    assert row["version"] is None and row["n_done"] == 0
    assert "| 1 | " + str(seeds[0]) + " | failed: integrity gate" in (tmp_path / "bad" / "continual.md").read_text()
