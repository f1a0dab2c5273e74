"""model.sd3.extra_prompts: other prompts to preserve join the remember set (with their own
conditions) and the integrity set, and the report judges each prompt apart. Tiny SD3 built in code."""

from __future__ import annotations

import pytest
import torch

from ray_unlearn import engine
from ray_unlearn import evaluate as ev
from ray_unlearn.config import ConfigError, EvalConfig, SD3Settings, load_config, validate
from ray_unlearn.families.sd3 import SD3Family
from ray_unlearn.metrics import Metrics
from tests.test_sd3 import PROMPT, tiny_pipe

ITALY = "the flag of italy"


def run_config(tmp_path, **sd3):
    return load_config(base={
        "model.family": "sd3", "model.path": "tiny",
        "model.sd3": {"max_sequence_length": 4, "guidance_scale": 3.0, **sd3},
        "sampler.steps": 2, "sampler.batch_size": 8,
        "targets": [{"seed": 3, "prompt": PROMPT}],
        "remember.n": 3, "eval.n_integrity": 3, "eval.fid": False, "eval.threshold": "fixed",
        "cache_dir": str(tmp_path / "cache"),
    })


def family_for(cfg):
    model = engine.with_run_prompt(cfg.model, cfg.targets)
    return SD3Family(model, cfg.sampler, pipe=tiny_pipe())  # a fresh pipeline: the family adds its LoRA


def test_extra_prompts_are_validated_and_a_file_is_read_once(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("the flag of italy\n\n   \n  the flag of france  \nthe flag of italy\n", encoding="utf-8")
    cfg = load_config(overrides=["model.family=sd3", f"model.sd3.extra_prompts_file={f}",
                                 "model.sd3.extra_prompts=[the flag of japan]"])
    s = cfg.model.sd3
    # listed first, then the file's lines: blank lines ignored, whitespace stripped, a repeat kept once
    assert s.extra_prompts == ["the flag of japan", "the flag of italy", "the flag of france"]
    assert s.extra_prompts_file is None  # the run records the prompts, not a path a worker may lack
    f.unlink()
    assert validate(cfg.model_dump(mode="json")).model.sd3.extra_prompts == s.extra_prompts
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text("\n  \n\t\n")
    (tmp_path / "latin1.txt").write_bytes("drapeau de l'\xe9t\xe9\n".encode("latin-1"))
    for override, words in [
        (f"model.sd3.extra_prompts_file={tmp_path / 'missing.txt'}", "no such file"),
        (f"model.sd3.extra_prompts_file={tmp_path / 'empty.txt'}", "empty or holds only blank lines"),
        (f"model.sd3.extra_prompts_file={tmp_path / 'blank.txt'}", "empty or holds only blank lines"),
        (f"model.sd3.extra_prompts_file={tmp_path / 'latin1.txt'}", "not UTF-8"),
        ("model.sd3.extra_prompts=['the flag of italy', '  ']", "extra_prompts[1] is empty"),
        ("model.sd3.seeds_per_extra_prompt=0", "seeds_per_extra_prompt"),
    ]:
        with pytest.raises(ConfigError, match="model.sd3") as err:
            load_config(overrides=[override])
        assert words in str(err.value)
    assert SD3Settings().extra_prompts == []  # off by default: the paper's setup, one prompt


def test_remember_set_holds_the_other_prompts_with_their_conditions(tmp_path):
    cfg = run_config(tmp_path, extra_prompts=[ITALY, PROMPT], seeds_per_extra_prompt=2)
    fam = family_for(cfg)
    assert fam.other_prompts == [ITALY]  # the run's own prompt, listed too, is not "another" prompt
    ref = engine.reference_outputs(cfg, fam, progress=False)
    assert list(ref.others) == [ITALY] and ref.cache_hits["other_prompts_cached"] == 0
    italy = ref.others[ITALY]
    remember_seeds, integrity_seeds = engine.other_prompt_seeds(cfg)
    assert remember_seeds == [1_000_000, 1_000_001] and integrity_seeds == [2_000_000, 2_000_001]
    # the other prompt's own outputs for those seeds, not the run prompt's
    torch.testing.assert_close(italy["remember"], fam.generate(fam.initial_noise(remember_seeds), prompt=ITALY))
    torch.testing.assert_close(italy["integrity"], fam.generate(fam.initial_noise(integrity_seeds), prompt=ITALY))
    assert not torch.allclose(italy["remember"], ref.remember[:2], atol=1e-3)
    assert len(ref.remember) == 3 and len(ref.integrity_base) == 3  # the run prompt's sets are as before
    # cached per prompt; the shared reference (a search's, over object storage) carries them
    again = engine.reference_outputs(cfg, fam, progress=False)
    assert again.cache_hits["other_prompts_cached"] == 1
    torch.testing.assert_close(again.others[ITALY]["remember"], italy["remember"])
    back = engine.Reference.from_bytes(ref.to_bytes())
    torch.testing.assert_close(back.others[ITALY]["integrity"], italy["integrity"])

    prep = engine.prepare(cfg, fam, reference=ref)
    data = prep.data()
    assert len(data.remember) == 3 + 2
    torch.testing.assert_close(data.remember[3:], fam.encode(italy["remember"]).cpu())
    own_pe, _ = fam.embed(PROMPT)
    italy_pe, italy_pooled = fam.embed(ITALY)
    pe = data.remember_cond["prompt_embeds"]
    assert all(torch.equal(pe[i], own_pe) for i in range(3)) and all(torch.equal(pe[i], italy_pe) for i in (3, 4))
    assert torch.equal(data.remember_cond["pooled_prompt_embeds"][4], italy_pooled)
    assert torch.equal(data.forget_cond["prompt_embeds"][0], own_pe)  # the targets keep the run prompt
    engine.train(prep, progress=False)  # the loop trains on the mixed-prompt remember set (SISS mixes conds too)


def test_without_extra_prompts_nothing_changes(tmp_path):
    cfg = run_config(tmp_path)
    fam = family_for(cfg)
    ref = engine.reference_outputs(cfg, fam, progress=False)
    assert ref.others is None and "other_prompts_cached" not in ref.cache_hits
    data = engine.prepare(cfg, fam, reference=ref, surrogates=False).data()
    assert data.remember_cond is None and data.forget_cond is None


def test_integrity_covers_the_other_prompts_and_reports_each(tmp_path):
    cfg = run_config(tmp_path, extra_prompts=[ITALY], seeds_per_extra_prompt=2)
    fam = family_for(cfg)
    prep = engine.prepare(cfg, fam, surrogates=False)
    result, _, integrity_new = engine.judge(prep, Metrics(cfg.eval.metrics), progress=False)
    assert len(integrity_new) == 3  # the run prompt's, for the grid beside prep.integrity_base
    integrity = result["integrity"]
    spec = result["specificity"]  # the rank test and collateral count the other prompts' outputs too
    assert integrity["n"] == 3 + 2 and spec["n"] + (spec["copies"]["n"] if spec["copies"]["left_out"] else 0) == 5
    own, italy = integrity["prompts"]
    assert (own["prompt"], own["own"], own["n"]) == (PROMPT, True, 3)
    assert (italy["prompt"], italy["own"], italy["n"]) == (ITALY, False, 2)
    # nothing trained: each prompt's hotfix outputs ARE its base outputs (drawn with its own prompt)
    assert italy["ssim"] > 0.999 and italy["sscd_median"] > 0.999 and italy["below_threshold"] == 0


def test_one_wrecked_prompt_fails_the_gate_whatever_the_pooled_mean():
    g = torch.Generator().manual_seed(0)
    smooth = torch.nn.functional.interpolate(torch.rand(10, 3, 8, 8, generator=g), size=64, mode="bilinear")
    new = smooth.clone()
    new[8:] = torch.rand(2, 3, 64, 64, generator=g)  # the last prompt's two outputs wrecked
    cfg = EvalConfig(min_integrity_ssim=0.6)
    metrics = Metrics(cfg.metrics)
    ssim_all = float(metrics.ssim(smooth, new).mean())
    assert ssim_all >= 0.6  # the pooled mean alone would pass

    def result():
        return {"integrity": {"ssim": round(ssim_all, 4), "ok": True, "why": None, "unavailable": {}},
                "forget_threshold": {"value": 0.5}, "specificity": {"copies": {"indices": [1]}},
                "all_forgotten": True, "passed": True}

    res = result()
    rows = ev.integrity_by_prompt(cfg, metrics, res, smooth, new, [("own", 4), ("a", 4), ("b", 2)])
    assert [r["n"] for r in rows] == [4, 4, 2] and [r["copies"] for r in rows] == [1, 0, 0]
    assert rows[0]["ssim"] == rows[1]["ssim"] == 1.0 and rows[2]["ssim"] < 0.6
    assert rows[2]["below_threshold"] == 2 and rows[1]["below_threshold"] == 0
    assert not res["integrity"]["ok"] and "'b'" in res["integrity"]["why"] and res["passed"] is False
    assert res["integrity"]["failed"] == ["prompt_ssim"]  # not a collateral failure alone: never retried
    res = result()
    ev.integrity_by_prompt(cfg, metrics, res, smooth, smooth.clone(), [("own", 4), ("a", 4), ("b", 2)])
    assert res["integrity"]["ok"] and res["passed"] is True
