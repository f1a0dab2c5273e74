"""Deletion requests carry their prompt (issue 15: "A request carries its prompt"): the record
stores it, `requests show` shows it, and a batch on an SD3 model unlearns (prompt, seed) or
(prompt, picture); a prompt on an unconditional model, or none on an SD3 model, fails that request
with the reason, not the batch."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from ray_unlearn.config import load_config
from ray_unlearn.requests.cli import requests_app
from ray_unlearn.requests.models import (
    RequestError, check_prompt, prompt_problem, screen_prompts, with_batch_prompt,
)
from ray_unlearn.requests.queue import Queue, duplicate_notice
from ray_unlearn.storage import open_store

PROMPT = "the flag of ireland"


def png(seed: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_prompt_is_checked_stored_and_kept_on_resubmission(tmp_path):
    assert check_prompt(None) is None and check_prompt("  the flag of Ireland \n") == "the flag of Ireland"
    for bad, says in (("   ", "empty"), ("a\x1b[2Jb", "control characters"), ("x" * 2001, "limit")):
        with pytest.raises(RequestError, match=says):
            check_prompt(bad)
    q = Queue(open_store(tmp_path / "store"))
    rec, created = q.submit(png(1), seed=3, prompt=" the flag of Ireland")
    assert created and rec.prompt == "the flag of Ireland" and q.get(rec.id).prompt == "the flag of Ireland"
    again, created = q.submit(png(1), seed=3, prompt="the flag of France")
    assert not created and again.prompt == "the flag of Ireland"
    assert "kept the first submission's prompt 'the flag of Ireland'" in duplicate_notice(again, 3, None, "the flag of France")
    assert duplicate_notice(again, 3, None, "the flag of Ireland") is None
    plain, _ = q.submit(png(2), seed=4)
    assert plain.prompt is None


def test_cli_submit_takes_the_prompt_and_show_prints_it(tmp_path):
    store = str(tmp_path / "store")
    img = tmp_path / "wrong.png"
    img.write_bytes(png(5))
    res = CliRunner().invoke(requests_app, ["submit", str(img), "--seed", "15", "--prompt", "the flag of Ireland",
                                            "--store", store, "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.output)["record"]
    assert rec["prompt"] == "the flag of Ireland" and rec["seed"] == 15
    shown = CliRunner().invoke(requests_app, ["show", rec["id"], "--store", store])
    assert shown.exit_code == 0 and "prompt" in shown.output and "the flag of Ireland" in shown.output
    bad = CliRunner().invoke(requests_app, ["submit", str(img), "--prompt", "\x1b[31mred", "--store", store])
    assert bad.exit_code != 0 and "control characters" in bad.output


class _Moves:
    def __init__(self):
        self.failed, self.returned = {}, {}

    def fail(self, rid, reason, **extra):
        self.failed[rid] = reason

    def release_or_fail(self, rec, reason, evidence=None):
        self.returned[rec.id] = reason


def test_a_batch_takes_one_prompt_and_says_why_it_refuses_a_request(tmp_path):
    q = Queue(open_store(tmp_path / "store"))
    ireland = q.submit(png(1), seed=3, prompt="the flag of Ireland")[0]
    france = q.submit(png(2), seed=4, prompt="the flag of France")[0]
    bare = q.submit(png(3), seed=5)[0]
    sd3 = load_config(None, ["model.family=sd3", "model.path=demo-flags"])
    ddpm = load_config(None, [])

    # an sd3 batch without model.sd3.prompt takes the oldest request's prompt
    cfg, keep = screen_prompts(sd3, [ireland, france, bare], moves := _Moves())
    assert cfg.model.sd3.prompt == "the flag of Ireland" and keep == [ireland]
    assert "needs the prompt" in moves.failed[bare.id] and "--prompt" in moves.failed[bare.id]
    assert "'the flag of Ireland'" in moves.returned[france.id] and "model.sd3.prompt" in moves.returned[france.id]
    # set by the operator, the batch's prompt wins
    set_ = load_config(None, ["model.family=sd3", "model.path=demo-flags", "model.sd3.prompt=the flag of France"])
    cfg, keep = screen_prompts(set_, [ireland, france], moves := _Moves())
    assert cfg.model.sd3.prompt == "the flag of France" and keep == [france] and ireland.id in moves.returned
    # an unconditional model takes no prompt
    cfg, keep = screen_prompts(ddpm, [ireland, bare], moves := _Moves())
    assert cfg is ddpm and keep == [bare] and "unconditional (ddpm)" in moves.failed[ireland.id]
    assert prompt_problem(bare, ddpm) is None and with_batch_prompt(ddpm, [ireland]) is ddpm


def cli(*args, timeout=1800):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "ray_unlearn.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow  # a tiny SD3 batch through the CLI: ~1-3 min on 2 shared cores
def test_sd3_request_with_its_prompt_through_the_cli(tmp_path):
    """`requests submit --prompt --seed` then `requests process` on a tiny SD3 built in code: the
    prompted request ends done or failed with its figures and its evidence names the prompt; the
    one without a prompt fails with the reason, and the batch still ran."""
    import torch

    from ray_unlearn.families.sd3_build import tiny_sd3_pipeline

    model = tmp_path / "tiny-sd3"
    pipe = tiny_sd3_pipeline(("the", "flag", "of", "ireland"), seed=0, image_size=32, num_layers=2, heads=2,
                             vae_blocks=2, max_length=8)
    pipe.save_pretrained(model)
    sd3 = {"max_sequence_length": 4, "guidance_scale": 3.0}
    picture = pipe(PROMPT, height=32, width=32, num_inference_steps=2, guidance_scale=3.0, max_sequence_length=4,
                   generator=torch.Generator().manual_seed(3)).images[0]  # the model's output for (prompt, seed 3)
    picture.save(tmp_path / "wrong.png")
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "bare.png")
    cfg = {"model": {"family": "sd3", "path": str(model), "sd3": sd3},
           "sampler": {"steps": 2, "batch_size": 4}, "surrogate": {"kind": "flip"}, "remember": {"n": 4},
           "train": {"steps": 2, "batch_forget": 1, "batch_remember": 2, "device": "cpu"},
           "eval": {"n_integrity": 4, "fid": False}, "cache_dir": str(tmp_path / "cache")}
    (tmp_path / "batch.yaml").write_text(yaml.safe_dump(cfg))
    store = tmp_path / "store"
    sub = cli("requests", "submit", tmp_path / "wrong.png", "--seed", 3, "--prompt", PROMPT, "--store", store, "--json")
    assert sub.returncode == 0, sub.stderr[-2000:]
    rid = json.loads(sub.stdout)["record"]["id"]
    bare = cli("requests", "submit", tmp_path / "bare.png", "--seed", 4, "--store", store, "--json")
    bare_id = json.loads(bare.stdout)["record"]["id"]
    res = cli("requests", "process", "--store", store, "--config", tmp_path / "batch.yaml", "--tracking-uri",
              f"sqlite:///{tmp_path}/mlflow.db", "--model", "sd3-req", "--limit", "2", "--json")
    assert res.returncode in (0, 1, 3), res.stderr[-3000:]  # OK, a request failed, or a gate returned one
    outcome = json.loads(res.stdout.strip().splitlines()[-1])  # the processor's summary is its last line
    rows = {r["id"]: r for r in outcome["requests"]}
    q = Queue(open_store(store))
    rec, refused = q.get(rid), q.get(bare_id)
    assert refused.state == "failed" and "needs the prompt" in refused.reason and rows[bare_id]["result"] == "failed"
    assert rec.prompt == PROMPT and rec.state in ("done", "failed", "pending"), (rec.state, rec.reason)
    if rec.state == "done":
        assert rec.evidence["prompt"] == PROMPT and "sscd_new" in rec.evidence
    else:  # failed, or returned by a gate: the batch's row for it holds the figures and the prompt
        assert rows[rid]["prompt"] == PROMPT and "sscd_new" in rows[rid], rows[rid]
        if rec.state == "failed":
            assert "SSCD" in rec.reason
        else:
            assert rec.evidence["last_attempt"]["prompt"] == PROMPT


ITALY = "the flag of italy"


class _BatchMoves(_Moves):
    def __init__(self):
        super().__init__()
        self.attempts = {}

    def release_or_fail(self, rec, reason, evidence=None):
        super().release_or_fail(rec, reason, evidence)
        self.attempts[rec.id] = evidence

    def not_produced(self, rid, reason, evidence):  # train_unproduced: gate 0 never refuses here
        raise AssertionError(f"{rid} refused as not produced: {reason}")


def test_a_batch_judges_each_other_prompt_and_a_wrecked_one_fails_its_gate(tmp_path, monkeypatch, capsys):
    """model.sd3.extra_prompts in a request batch, in process on a tiny SD3 built in code: the other
    prompt's integrity samples join the batch's integrity set (as engine.judge does), each prompt is
    judged apart into the request's evidence (and `requests show` prints them), and a request whose
    hotfix wrecks the other prompt goes back to pending, the pooled SSIM and collateral passing."""
    import torch

    from ray_unlearn import engine
    from ray_unlearn.families.sd3_build import tiny_sd3_pipeline
    from ray_unlearn.requests.batch import Batch, BatchSettings
    from ray_unlearn.requests.common import BatchContext, Outcome

    model = tmp_path / "tiny-sd3"
    tiny_sd3_pipeline(("the", "flag", "of", "ireland", "italy"), seed=0, image_size=32, num_layers=2, heads=2,
                      vae_blocks=2, max_length=8).save_pretrained(model)
    # a picture the model never drew (gate 0 overridden) and no rank test: "forgotten" holds by
    # construction, so what decides here is the integrity gate; SSIM bound 0.6 (the default), no
    # collateral bound: only the per-prompt rule can refuse a hotfix that wrecks 2 of 6 outputs
    cfg = load_config(base={
        "model.family": "sd3", "model.path": str(model),
        "model.sd3": {"max_sequence_length": 4, "guidance_scale": 3.0, "prompt": PROMPT, "extra_prompts": [ITALY],
                      "seeds_per_extra_prompt": 2},
        "sampler.steps": 2, "sampler.batch_size": 8, "surrogate.kind": "flip", "remember.n": 3,
        "train": {"steps": 1, "lr": 1e-6, "batch_forget": 1, "batch_remember": 2, "device": "cpu"},
        "eval": {"n_integrity": 4, "fid": False, "specificity_percentile": None, "max_collateral": 1.0},
        "cache_dir": str(tmp_path / "cache")})
    store = open_store(tmp_path / "store")
    q = Queue(store)
    kept = q.submit(png(11, 32), seed=3, prompt=PROMPT)[0]
    wrecked = q.submit(png(12, 32), seed=4, prompt=PROMPT)[0]
    claimed = {r.id: r for r in q.claim("tester", 2)}
    ctx = BatchContext(store=store, queue=q, lineage=None, registry=None, holder="tester", tracking_uri="", limit=2,
                       retention="keep", max_attempts=5)
    (tmp_path / "scratch").mkdir()
    batch = Batch(ctx, moves := _BatchMoves(), None, BatchSettings(cfg, None, tmp_path / "scratch", True),
                  Outcome("tester"))
    batch._load()
    batch.checks = []
    assert batch.groups == [(PROMPT, 4), (ITALY, 2)] and len(batch.integrity_base) == 6

    batch._one(claimed[kept.id])  # nearly nothing trained: every prompt's outputs stay
    assert not moves.failed and not moves.returned, (moves.failed, moves.returned)
    rec, evidence = batch.passed[0]
    after = evidence["integrity_after_request"]
    assert after["n"] == 6
    own, italy = after["prompts"]
    assert (own["prompt"], own["own"], own["n"], italy["prompt"], italy["own"], italy["n"]) == \
        (PROMPT, True, 4, ITALY, False, 2)
    assert italy["ssim"] > 0.99 and italy["sscd_median"] > 0.99 and italy["below_threshold"] == 0
    figures, _ = batch._final_check()  # the batch's final figures hold them too
    assert [r["prompt"] for r in figures["prompts"]] == [PROMPT, ITALY] and figures["ok"]
    # the text summaries (`requests process`, and `unlearn`/`evaluate` on the same figures) print a row per prompt
    from ray_unlearn.cli import _summary as report_summary
    from ray_unlearn.requests.cli import _summary as batch_summary

    batch_summary(batch.out)
    printed = capsys.readouterr().out
    text = report_summary({"integrity": figures, "passed": True, "wall_seconds": 1.0})
    for out in (printed, text):
        assert "integrity by prompt" in out and f"{PROMPT} (run prompt)" in out, out
        italy_line = next(line for line in out.splitlines() if ITALY in line)
        assert str(figures["prompts"][1]["ssim"]) in italy_line and "│ 2 " in italy_line, italy_line

    real = engine.other_prompts_integrity

    def wreck(*args, **kwargs):  # the hotfix draws noise for the other prompt
        out = real(*args, **kwargs)
        return torch.rand(out.shape, generator=torch.Generator().manual_seed(0)).to(out)

    monkeypatch.setattr(engine, "other_prompts_integrity", wreck)
    batch._one(claimed[wrecked.id])
    assert len(batch.passed) == 1 and not moves.failed
    reason = moves.returned[wrecked.id]
    assert f"on '{ITALY}' below 0.6" in reason and "collateral" not in reason, reason
    attempt = moves.attempts[wrecked.id]  # the figures of the refused attempt, kept in the request's evidence
    assert attempt["integrity_ssim"] >= 0.6  # the pooled mean alone would have let it through
    own, italy = attempt["integrity_prompts"]
    assert own["ssim"] > 0.99 and italy["ssim"] < 0.6 and italy["below_threshold"] == 2

    # `requests show` prints each prompt's row from the evidence
    q.complete(kept.id, "tester", evidence)
    shown = CliRunner().invoke(requests_app, ["show", kept.id, "--store", str(tmp_path / "store")])
    assert shown.exit_code == 0, shown.output
    assert "integrity by prompt, after this request" in shown.output and ITALY in shown.output
    assert "<2 prompts: table below>" in shown.output
