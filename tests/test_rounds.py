"""train.extra_rounds: more rounds of `steps` while a target's output is still at or above the forget
threshold, and the steps trained in the report."""

import pytest
import torch

from ray_unlearn import engine
from ray_unlearn.config import load_config


def _prep(model_dir, tmp_path, *sets):
    cfg = load_config(None, [f"model.path={model_dir}", f"cache_dir={tmp_path / 'cache'}", "targets=[{seed: 3}]",
                             "sampler.steps=2", "remember.n=4", "eval.n_integrity=2", "eval.fid=false",
                             "surrogate.kind=flip", "train.steps=2", "train.device=cpu", *sets])
    return engine.prepare(cfg)


def test_rounds_continue_while_the_target_is_kept_and_stop_once_it_is_forgotten(tiny_model_dir, tmp_path, monkeypatch):
    # a threshold no output can get under: every extra round runs, and the config's steps are restored
    prep = _prep(tiny_model_dir, tmp_path, "eval.threshold=fixed", "eval.fixed_threshold=1e-6", "train.extra_rounds=2",
                 "train.round_steps=2")
    loop = engine.train(prep, progress=False)
    assert prep.steps_trained == loop.step_count == 6 and loop.cfg.steps == 2
    assert engine.targets_forgotten(prep, 6) is False
    # forgotten after the second round: it stops there
    answers = iter([False, True])
    monkeypatch.setattr(engine, "targets_forgotten", lambda prep, steps: next(answers))
    prep = _prep(tiny_model_dir, tmp_path, "train.extra_rounds=5")  # rounds of half `steps` by default: 2 + 1
    assert engine.train(prep, progress=False).step_count == 3 and prep.steps_trained == 3

    def never(prep, steps):
        raise AssertionError("checked without extra rounds")

    monkeypatch.setattr(engine, "targets_forgotten", never)  # 0 rounds: exactly `steps`, no check
    prep = _prep(tiny_model_dir, tmp_path, "train.extra_rounds=0")
    assert engine.train(prep, progress=False).step_count == 2


def test_an_untouched_model_still_makes_its_target_and_the_report_has_the_steps(tiny_model_dir, tmp_path):
    prep = _prep(tiny_model_dir, tmp_path, "eval.threshold=fixed", "eval.fixed_threshold=0.99999", "train.extra_rounds=0")
    assert engine.targets_forgotten(prep, 0) is False  # its output for the seed is the target itself
    engine.train(prep, progress=False)
    result, _, _ = engine.judge(prep, progress=False)
    assert result["steps_trained"] == prep.steps_trained == 2


def test_paper_presets_train_exactly_their_steps():
    from ray_unlearn.methods import METHODS

    for m in METHODS:
        assert load_config(None, [f"method.name={m}"], preset="paper").train.extra_rounds == 0
    assert load_config(None, []).train.extra_rounds > 0
    with pytest.raises(Exception, match="extra_rounds"):
        load_config(None, ["train.extra_rounds=-1"])


def test_short_rounds_add_round_steps_each(tiny_model_dir, tmp_path):
    # train.round_steps: the first round is `steps`, every extra round `round_steps`
    prep = _prep(tiny_model_dir, tmp_path, "eval.threshold=fixed", "eval.fixed_threshold=1e-6", "train.extra_rounds=3",
                 "train.round_steps=1")
    loop = engine.train(prep, progress=False)
    assert prep.steps_trained == loop.step_count == 2 + 3 * 1 and loop.cfg.steps == 2


def test_the_round_margin_keeps_a_target_just_under_the_threshold_training(tiny_model_dir, tmp_path, monkeypatch):
    prep = _prep(tiny_model_dir, tmp_path)
    metrics = engine.build_metrics(prep.cfg)
    picture = prep.targets[0].image
    other = picture.flip(-1).roll(7, dims=-2)  # another picture, whatever its SSCD to the target
    sim = float(metrics.sscd(picture[None], other[None])[0])
    assert 0.0 < sim < 0.95
    monkeypatch.setattr(engine.ev, "model_outputs_for_targets", lambda fam, targets: other[None].to(fam.device))
    at = f"eval.fixed_threshold={sim + 0.02:.6f}"  # the output is 0.02 under the threshold
    prep = _prep(tiny_model_dir, tmp_path, "eval.threshold=fixed", at, "train.round_margin=0")
    assert engine.targets_forgotten(prep, 0) is True
    prep = _prep(tiny_model_dir, tmp_path, "eval.threshold=fixed", at, "train.round_margin=0.05")
    assert engine.targets_forgotten(prep, 0) is False  # not 0.05 under: another round
    assert prep.round_check is not None  # the SSCD model and threshold are kept for the next round
    with pytest.raises(Exception, match="round_margin"):
        load_config(None, ["train.round_margin=-0.1"])


def test_each_extra_round_trains_at_a_grown_lr_and_the_config_is_restored(tiny_model_dir, tmp_path, monkeypatch):
    from ray_unlearn.loop import UnlearnLoop

    seen = []
    real_run = UnlearnLoop.run

    def run(self, report=None, progress=True):
        seen.append((self.cfg.steps, self.cfg.lr, [g["lr"] for g in self.optimizer.param_groups]))
        return real_run(self, report, progress)

    monkeypatch.setattr(UnlearnLoop, "run", run)
    prep = _prep(tiny_model_dir, tmp_path, "eval.threshold=fixed", "eval.fixed_threshold=1e-6", "train.extra_rounds=2",
                 "train.round_steps=1", "train.lr=1e-4", "train.round_lr_growth=1.5")
    loop = engine.train(prep, progress=False)
    assert [s for s, _, _ in seen] == [2, 3, 4]
    for (_, lr, groups), want in zip(seen, [1e-4, 1.5e-4, 2.25e-4]):
        assert lr == pytest.approx(want) and all(g == pytest.approx(want) for g in groups)
    assert loop.cfg.lr == 1e-4  # the config after training is the one asked for
    with pytest.raises(Exception, match="round_lr_growth"):
        load_config(None, ["train.round_lr_growth=0.4"])
    assert load_config(None, ["train.round_lr_growth=0.8"]).train.round_lr_growth == 0.8  # a falling lr


def test_a_round_gives_the_kept_targets_their_share_of_the_forget_samples():
    import types

    import torch

    prep = types.SimpleNamespace(targets=[0, 1, 2, 3], forget_weights=None, kept=torch.tensor([False, True, False, False]))
    w = engine.focus_on_kept(prep, 0.5)
    assert w.tolist() == pytest.approx([1 / 6, 0.5, 1 / 6, 1 / 6])
    # anchored replay's weights (earlier requests 0.5 in all, the new one 0.5) split within each group
    prep.forget_weights, prep.kept = torch.tensor([0.25, 0.25, 0.5]), torch.tensor([True, True, False])
    prep.targets = [0, 1, 2]
    assert engine.focus_on_kept(prep, 0.8).tolist() == pytest.approx([0.4, 0.4, 0.2])
    for kept in ([True, True, True], [False, False, False]):  # nothing to focus on: as before
        prep.kept = torch.tensor(kept)
        assert engine.focus_on_kept(prep, 0.5) is prep.forget_weights
    prep.kept = torch.tensor([True, False, False])
    assert engine.focus_on_kept(prep, 0.0) is prep.forget_weights


def test_rounds_sample_the_kept_target_more(tiny_model_dir, tmp_path, monkeypatch):
    import torch

    cfg_sets = ["targets=[{seed: 3}, {seed: 4}]", "train.extra_rounds=2", "train.round_steps=1", "train.batch_forget=8"]
    prep = _prep(tiny_model_dir, tmp_path, *cfg_sets)
    drawn = []
    real_batch = engine.UnlearnLoop.batch

    def batch(self):
        out = real_batch(self)
        drawn.append((self.step_count, self.data.forget_weights))
        return out

    def check(prep, steps):  # the second target stays kept
        prep.kept = torch.tensor([False, True])
        return False

    monkeypatch.setattr(engine.UnlearnLoop, "batch", batch)
    monkeypatch.setattr(engine, "targets_forgotten", check)
    engine.train(prep, progress=False)
    assert [s for s, _ in drawn] == [0, 1, 2, 3]
    assert all(w is None for s, w in drawn if s < 2)  # the first round: uniform
    assert all(w.tolist() == pytest.approx([0.2, 0.8]) for s, w in drawn if s >= 2)  # round_focus 0.8 of 2 targets
    prep = _prep(tiny_model_dir, tmp_path, *cfg_sets, "train.round_focus=0.75")
    drawn.clear()
    engine.train(prep, progress=False)
    assert all(w.tolist() == pytest.approx([0.25, 0.75]) for s, w in drawn if s >= 2)


def _scripted_checks(monkeypatch, excesses):
    """targets_forgotten answering from a script of worst-target excesses (never forgotten), and the
    trainable weights at each check."""
    seen = []
    script = iter(excesses)

    def check(prep, steps):
        prep.excess = next(script)
        seen.append((steps, [p.detach().clone() for p in prep.family.trainable_parameters()]))
        return False

    monkeypatch.setattr(engine, "targets_forgotten", check)
    return seen


def test_rounds_that_run_out_end_on_the_best_checks_weights(tiny_model_dir, tmp_path, monkeypatch):
    # checks after 2, 3, 4 steps, and the final one after 5: the second (excess 0.01) is the best
    seen = _scripted_checks(monkeypatch, [0.05, 0.01, 0.08, 0.09])
    prep = _prep(tiny_model_dir, tmp_path, "train.extra_rounds=3", "train.round_steps=1")
    loop = engine.train(prep, progress=False)
    assert [s for s, _ in seen] == [2, 3, 4, 5] and loop.step_count == prep.steps_trained == 5
    now = [p.detach() for p in loop.params]
    assert all(torch.equal(a, b) for a, b in zip(now, seen[1][1]))  # the weights after 3 steps
    assert not all(torch.equal(a, b) for a, b in zip(now, seen[3][1]))  # not the last ones
    assert prep.best_check == {"steps": 3, "excess": 0.01, "last_excess": 0.09}
    result, _, _ = engine.judge(prep, progress=False)
    assert result["weights_of_step"]["steps"] == 3 and result["steps_trained"] == 5

    # the last check is the best: the last weights stay
    seen = _scripted_checks(monkeypatch, [0.05, 0.01, 0.08, 0.0])
    prep = _prep(tiny_model_dir, tmp_path, "train.extra_rounds=3", "train.round_steps=1")
    loop = engine.train(prep, progress=False)
    assert all(torch.equal(p.detach(), b) for p, b in zip(loop.params, seen[3][1])) and prep.best_check is None

    # round_keep_best off: the last weights, and no final check
    seen = _scripted_checks(monkeypatch, [0.05, 0.01, 0.08])
    prep = _prep(tiny_model_dir, tmp_path, "train.extra_rounds=3", "train.round_steps=1", "train.round_keep_best=false")
    loop = engine.train(prep, progress=False)
    assert len(seen) == 3 and prep.best_check is None
    assert not all(torch.equal(p.detach(), b) for p, b in zip(loop.params, seen[1][1]))


def test_spread_sampling_gives_each_target_its_share_at_evenly_spaced_steps():
    from ray_unlearn.loop import spread_indices

    # the new target keeps half of every batch; ten replayed ones share the rest
    w = torch.tensor([0.05] * 10 + [0.5])
    draws = [spread_indices(w, 11, 4, d) for d in range(200)]
    assert all(int((b == 10).sum()) == 2 for b in draws)  # exactly its half, every batch
    visits = {i: [d for d, b in enumerate(draws) if bool((b == i).any())] for i in range(10)}
    for i, ds in visits.items():
        assert 36 <= len(ds) <= 44, (i, len(ds))  # 200 batches x 4 x 0.05 = 40 samples each
        assert max(b - a for a, b in zip([-1, *ds], [*ds, 200])) <= 10, (i, ds)  # never long unvisited
    # uniform weights: every index alike
    counts = torch.bincount(torch.cat([spread_indices(None, 5, 2, d) for d in range(100)]), minlength=5)
    assert counts.min() >= 38 and counts.max() <= 42


def test_spread_sampling_numbers_every_micro_batch_in_the_loop(tiny_model_dir, tmp_path, monkeypatch):
    from ray_unlearn import loop as loop_mod

    draws = []
    real = loop_mod.spread_indices

    def spy(weights, n, k, draw):
        draws.append(draw)
        return real(weights, n, k, draw)

    monkeypatch.setattr(loop_mod, "spread_indices", spy)
    prep = _prep(tiny_model_dir, tmp_path, "train.extra_rounds=0", "train.steps=3", "train.grad_accum=2",
                 "train.forget_sampling=spread")
    loop = engine.train(prep, progress=False)
    assert loop.step_count == 3 and draws == [0, 1, 2, 3, 4, 5]  # one offset per micro-batch, none repeated
    assert all(torch.isfinite(p).all() for p in loop.params)
    for rank in range(2):  # two Ray Train workers take interleaved draws of the one sequence, never the same
        draws.clear()
        engine.train(_prep(tiny_model_dir, tmp_path, "train.extra_rounds=0", "train.steps=3", "train.grad_accum=2",
                           "train.forget_sampling=spread"), progress=False, shard=(rank, 2))
        assert draws == [2 * d + rank for d in range(6)]
