"""Shared base outputs: sampled in one pass, shared by every trial, equal to what a run computes alone."""

import pytest
import torch

from ray_unlearn.config import load_config
from ray_unlearn.engine import Reference, load_family, prepare, reference_outputs


def cfg_for(model_dir, tmp_path, n_integrity=4, **extra):
    sets = [f"model.path={model_dir}", "sampler.steps=3", "remember.n=3", f"eval.n_integrity={n_integrity}",
            f"cache_dir={tmp_path / 'cache'}", "train.device=cpu"]
    return load_config(overrides=sets + [f"{k}={v}" for k, v in extra.items()],
                       base={"targets": [{"seed": 3}, {"seed": 5}]})


def counting(family):
    calls = []
    generate = family.generate

    def wrapped(noise, **kw):
        calls.append(len(noise))
        return generate(noise, **kw)

    family.generate = wrapped
    return calls


def test_one_sampling_pass_for_everything_a_search_shares(tiny_model_dir, tmp_path):
    cfg = cfg_for(tiny_model_dir, tmp_path)
    fam = load_family(cfg, lora=False)
    calls = counting(fam)
    ref = reference_outputs(cfg, fam, targets=True, progress=False)
    assert calls == [3 + 4 + 2]  # remember + integrity + the two target seeds, one generate call
    assert ref.cache_hits == {"integrity_base": False, "remember": False, "base_passes": 1}
    # a seed target's image is the base output for its seed, and so is its "before" output
    assert torch.equal(ref.targets[0].image, ref.target_base[0])
    again = reference_outputs(cfg, fam, targets=True, progress=False)
    assert calls[1:] == [2]  # cached remember/integrity; only the targets' seeds are sampled
    assert again.cache_hits["remember"] and again.cache_hits["integrity_base"]
    assert torch.equal(again.integrity_base, ref.integrity_base)


def test_prepare_from_shared_reference_matches_prepare_alone(tiny_model_dir, tmp_path):
    cfg = cfg_for(tiny_model_dir, tmp_path)
    ref = Reference.from_bytes(reference_outputs(cfg, targets=True, progress=False).to_bytes())  # as trials get it
    fam = load_family(cfg)
    calls = counting(fam)
    shared = prepare(cfg, fam, reference=ref)
    assert calls == []  # a trial given the reference samples nothing from the base model
    alone = prepare(cfg_for(tiny_model_dir, tmp_path / "other"))
    for name in ("remember", "integrity_base", "target_base", "surrogates"):
        assert torch.allclose(getattr(shared, name), getattr(alone, name), atol=1e-6), name
    assert [t.id for t in shared.targets] == [t.id for t in alone.targets]
    for a, b in zip(shared.targets, alone.targets):
        assert torch.allclose(a.image, b.image, atol=1e-6) and torch.equal(a.noise, b.noise)


def test_a_smaller_run_uses_a_prefix_of_the_reference(tiny_model_dir, tmp_path):
    big = reference_outputs(cfg_for(tiny_model_dir, tmp_path, n_integrity=6), targets=True, progress=False)
    small = prepare(cfg_for(tiny_model_dir, tmp_path, n_integrity=4), reference=big)
    assert torch.equal(small.integrity_base, big.integrity_base[:4])  # proxy seeds = first seeds of the full set
    with pytest.raises(ValueError, match="n_integrity=8"):
        prepare(cfg_for(tiny_model_dir, tmp_path, n_integrity=8), reference=big)
