"""The anchored remember term (remember.target='base'): regress onto the frozen original base."""

import copy

import pytest
import torch
from conftest import tiny_scheduler, tiny_unet

from ray_unlearn.config import ModelConfig, SamplerConfig, UnlearnConfig
from ray_unlearn.engine import anchor_teacher
from ray_unlearn.families.ddpm import DDPMFamily
from ray_unlearn.methods import METHODS, build_method
from ray_unlearn.methods.base import grads_of


def family(seed: int = 0) -> DDPMFamily:
    return DDPMFamily(ModelConfig(path="tiny"), SamplerConfig(steps=4), unet=tiny_unet(seed=seed), scheduler=tiny_scheduler())


def cfg(target: str, method: str = "surrogate") -> UnlearnConfig:
    return UnlearnConfig.model_validate({"remember": {"target": target}, "method": {"name": method}})


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    return {"forget": {"x0": x[:2], "x_s": x[:2].flip(-1)}, "remember": {"x0": x}}


@pytest.mark.parametrize("name", ["surrogate", "neggrad"])
def test_anchor_equal_to_the_model_gives_zero_remember_loss_and_gradient(name):
    fam = family()
    c = cfg("base", name)
    method = build_method(c.method, fam)
    method.teacher = anchor_teacher(c, fam, None)
    loss, _ = method.remember_loss(batch(), torch.Generator().manual_seed(1))
    assert float(loss) == pytest.approx(0.0, abs=1e-10)  # float noise only: same weights, same input
    assert all(float(g.abs().max()) < 1e-6 for g in grads_of(loss, fam.trainable_parameters()))


def test_anchor_after_drift_pulls_toward_the_base_not_the_noise():
    fam = family()
    c = cfg("base")
    teacher = anchor_teacher(c, fam, None)
    with torch.no_grad():  # the hotfix drifted away from the base
        for p in fam.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    anchored = build_method(c.method, fam)
    anchored.teacher = teacher
    plain = build_method(cfg("noise").method, fam)
    la, _ = anchored.remember_loss(batch(), torch.Generator().manual_seed(1))
    ln, _ = plain.remember_loss(batch(), torch.Generator().manual_seed(1))
    assert float(la) > 0.0
    assert float(la) != pytest.approx(float(ln))
    # the same draws: the anchored target is exactly the teacher's prediction on the same x_t
    g = torch.Generator().manual_seed(1)
    x_t, _, t = anchored.noised(batch()["remember"]["x0"], g)
    with torch.no_grad():
        want = ((fam.predict(x_t, t) - fam.predict(x_t, t, model=teacher)) ** 2).flatten(1).mean(1)
    assert anchored.cfg.remember_weighting == "one"  # the default: every remember sample weighs 1
    assert float(la) == pytest.approx(float(want.mean()), rel=1e-5)


def test_teacher_is_a_frozen_copy_or_the_separate_base():
    fam, base = family(0), family(1)
    c = cfg("base")
    own = anchor_teacher(c, fam, None)
    assert own is not fam.model and not any(p.requires_grad for p in own.parameters())
    with torch.no_grad():
        next(fam.model.parameters()).add_(1.0)  # training the family leaves its copy alone
    assert not torch.equal(next(own.parameters()), next(fam.model.parameters()))
    assert anchor_teacher(c, fam, base) is base.model  # a batch's original base lends its network
    assert anchor_teacher(cfg("noise"), fam, base) is None


def test_noise_target_is_the_standard_loss_bit_for_bit():
    fam = family()
    m = build_method(cfg("noise").method, fam)
    mse, t = m.remember_mse(batch()["remember"], torch.Generator().manual_seed(3))
    ref, t_ref = m.standard_loss(batch()["remember"]["x0"], torch.Generator().manual_seed(3))
    assert torch.equal(mse, ref) and torch.equal(t, t_ref)


@pytest.mark.parametrize("name", list(METHODS))
def test_auto_anchors_the_surrogate_method_and_leaves_the_baselines_on_noise(name):
    fam = family()
    teacher = anchor_teacher(cfg("auto", name), fam, None)
    assert (teacher is not None) == METHODS[name].uses_surrogate
