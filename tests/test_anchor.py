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
    assert own is not fam.model and not any(p.requires_grad for p in own.frozen.values())
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 50])
    with torch.no_grad():
        before = fam.predict(x, t)
        next(fam.model.parameters()).add_(1.0)  # training the family leaves its copy alone
    name = next(iter(dict(fam.model.named_parameters())))
    assert not torch.equal(own.weights()[name], dict(fam.model.named_parameters())[name])
    assert torch.allclose(fam.predict(x, t, model=own), before, atol=1e-6) and not torch.allclose(fam.predict(x, t), before)
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


# ---- continual.replay_as 'hold': done requests held where the serving network has them -------------

def hold_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed + 100)
    return {**batch(seed), "hold": {"x0": torch.rand(3, 1, 16, 16, generator=g) * 2 - 1,
                                    "noise": torch.randn(3, 1, 16, 16, generator=g)}}


@pytest.mark.parametrize("weighting", ["one", "complement"])
def test_hold_samples_join_the_remember_term_against_the_serving_network(weighting):
    """remember loss = the mean over the remember samples' (weighted) errors against the base teacher
    and the hold samples' errors against the SERVING teacher, each hold sample noised with its own
    noise at the next uniform timesteps of the same generator."""
    fam = family()
    c = UnlearnConfig.model_validate({"remember": {"target": "base"},
                                      "method": {"name": "surrogate", "remember_weighting": weighting}})
    base = anchor_teacher(c, fam, None)
    with torch.no_grad():
        for p in fam.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    serving = copy.deepcopy(fam.model).eval().requires_grad_(False)
    with torch.no_grad():  # this request's training moved it on from the serving version
        for p in fam.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    method = build_method(c.method, fam)
    method.teacher, method.hold_teacher = base, serving
    b = hold_batch()
    loss, logs = method.remember_loss(b, torch.Generator().manual_seed(1))

    g = torch.Generator().manual_seed(1)
    x_t, _, t = method.noised(b["remember"]["x0"], g)
    th = method.timesteps(3, g)
    h_t = fam.add_noise(b["hold"]["x0"], b["hold"]["noise"], th)
    with torch.no_grad():
        r = ((fam.predict(x_t, t) - fam.predict(x_t, t, model=base)) ** 2).flatten(1).mean(1)
        h = ((fam.predict(h_t, th) - fam.predict(h_t, th, model=serving)) ** 2).flatten(1).mean(1)
    w = 1 - method._weight(t) if weighting == "complement" else torch.ones_like(r)
    assert float(loss) == pytest.approx(float(torch.cat([w * r, h]).mean()), rel=1e-5)
    assert float(logs["hold/mse"]) == pytest.approx(float(h.mean()), rel=1e-5) and float(h.mean()) > 0
    method.hold_teacher = None  # no hold teacher: the hold samples are not read
    plain, plain_logs = method.remember_loss(b, torch.Generator().manual_seed(1))
    assert float(plain) == pytest.approx(float((w * r).mean()), rel=1e-5) and "hold/mse" not in plain_logs


def test_hold_term_is_zero_at_the_serving_weights_and_pulls_back_after_a_step():
    fam = family()
    c = cfg("base")
    method = build_method(c.method, fam)
    method.hold_teacher = copy.deepcopy(fam.model).eval().requires_grad_(False)
    part = hold_batch()["hold"]
    params = fam.trainable_parameters()
    at_start = method.hold_mse(part, torch.Generator().manual_seed(2)).mean()
    assert float(at_start) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    drifted = method.hold_mse(part, torch.Generator().manual_seed(2)).mean()
    grads = grads_of(drifted, params)
    with torch.no_grad():
        for p, gr in zip(params, grads):
            p.sub_(0.05 * gr)
    assert float(method.hold_mse(part, torch.Generator().manual_seed(2)).mean()) < float(drifted)


def test_hold_set_is_the_serving_output_of_each_done_seed_with_a_frozen_serving_copy():
    from types import SimpleNamespace

    from ray_unlearn.config import TargetSpec
    from ray_unlearn.engine import hold_set

    fam = family()
    prep = SimpleNamespace(family=fam, hold=None, hold_teacher=None)
    assert hold_set(prep, [TargetSpec(seed=5), TargetSpec(seed=9)]) == 2
    images, noise = prep.hold
    assert torch.equal(noise, fam.initial_noise([5, 9]).float().cpu())
    assert torch.allclose(images, fam.generate(fam.initial_noise([5, 9])).cpu(), atol=1e-6)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 50])
    with torch.no_grad():
        serving = fam.predict(x, t)
    teacher = prep.hold_teacher
    fam.model.train()
    assert torch.allclose(fam.predict(x, t, model=teacher), serving, atol=1e-6)  # the serving network...
    assert fam.model.training  # ...run in eval mode, the live network left in the mode it was in
    assert set(teacher.frozen) == {n for n, p in fam.model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # a copy: training the family leaves the teacher where the serving weights were
        for p in fam.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert torch.allclose(fam.predict(x, t, model=teacher), serving, atol=1e-6)
    assert not torch.allclose(fam.predict(x, t), serving, atol=1e-3)
    assert all(p.requires_grad for p in fam.model.parameters())  # the teacher froze nothing of the live network


def test_hold_set_takes_outputs_already_sampled_and_samples_only_the_rest(monkeypatch):
    from types import SimpleNamespace

    from ray_unlearn.config import TargetSpec
    from ray_unlearn.engine import hold_set

    fam = family()
    given = fam.generate(fam.initial_noise([5])).cpu()[0]
    sampled, real = [], fam.generate
    monkeypatch.setattr(fam, "generate", lambda noise, *a, **kw: sampled.append(len(noise)) or real(noise, *a, **kw))
    prep = SimpleNamespace(family=fam, hold=None, hold_teacher=None)
    assert hold_set(prep, [TargetSpec(seed=5), TargetSpec(seed=9)], outputs=[given, None]) == 2
    assert sampled == [1]  # only seed 9's output was sampled here
    images, noise = prep.hold
    assert torch.equal(images[0], given)
    assert torch.allclose(images[1], real(fam.initial_noise([9])).cpu()[0], atol=1e-6)
    with pytest.raises(ValueError, match="pair up"):
        hold_set(prep, [TargetSpec(seed=5)], outputs=[given, None])


def test_the_loop_draws_as_many_hold_samples_as_forget_samples():
    from ray_unlearn.config import TrainConfig
    from ray_unlearn.loop import UnlearnData, UnlearnLoop

    fam = family()
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    hold, noise = torch.rand(5, 1, 16, 16), torch.randn(5, 1, 16, 16)
    data = UnlearnData(x[:2], x[:2].flip(-1), x, hold=hold, hold_noise=noise)
    loop = UnlearnLoop(fam, build_method(cfg("base").method, fam), data, TrainConfig(batch_forget=3, batch_remember=2))
    b = loop.batch()
    assert b["hold"]["x0"].shape == (3, 1, 16, 16)
    for x0, n in zip(b["hold"]["x0"], b["hold"]["noise"]):  # each hold image travels with its own noise
        i = next(i for i in range(5) if torch.equal(hold[i], x0))
        assert torch.equal(noise[i], n)
    no_hold = UnlearnLoop(fam, build_method(cfg("base").method, fam), UnlearnData(x[:2], x[:2].flip(-1), x),
                          TrainConfig(batch_forget=3, batch_remember=2))
    assert "hold" not in no_hold.batch()
