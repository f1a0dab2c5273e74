"""Continual strategies: the weight arithmetic (ray_unlearn/continual.py) on hand-computed cases, the
pull plumbed through the loop, the settings a batch refuses, and the real processor on a tiny model
built in code under each strategy, two requests in two batches (docs/requests.md "Continual strategies")."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_scheduler, tiny_unet

from ray_unlearn import continual
from ray_unlearn.config import ConfigError, ModelConfig, SamplerConfig, TrainConfig, load_config
from ray_unlearn.families.ddpm import DDPMFamily
from ray_unlearn.loop import UnlearnData, UnlearnLoop
from ray_unlearn.methods import METHODS, build_method


def family(seed: int = 0) -> DDPMFamily:
    return DDPMFamily(ModelConfig(path="tiny"), SamplerConfig(steps=2), unet=tiny_unet(seed=seed), scheduler=tiny_scheduler())


# ---- the arithmetic, by hand -----------------------------------------------------------------------

def test_ties_by_hand():
    """density 0.5 keeps 2 of 4 entries per delta; sign elected by the summed mass; mean of the agreeing."""
    d1 = {"w": torch.tensor([3.0, -1.0, 0.5, 2.0])}  # keeps 3 (0), 2 (3)
    d2 = {"w": torch.tensor([-2.0, 4.0, 1.0, 0.1])}  # keeps -2 (0), 4 (1)
    d3 = {"w": torch.tensor([1.5, 1.0, -3.0, 0.2])}  # keeps 1.5 (0), -3 (2)
    # entry 0: 3 - 2 + 1.5 > 0 -> +, mean(3, 1.5) = 2.25; entry 1: 4; entry 2: -3; entry 3: 2
    got = continual.merge_deltas([d1, d2, d3], "ties", density=0.5)
    assert torch.equal(got["w"], torch.tensor([2.25, 4.0, -3.0, 2.0]))
    # a negative majority: entry 0 of (-3, 2, -0.5) at full density -> -, mean(-3, -0.5)
    got = continual.merge_deltas([{"w": torch.tensor([-3.0])}, {"w": torch.tensor([2.0])},
                                  {"w": torch.tensor([-0.5])}], "ties", density=1.0)
    assert torch.equal(got["w"], torch.tensor([-1.75]))


def test_sum_merge_and_missing_tensors_count_as_zero():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([[0.5]])}
    b = {"x": torch.tensor([-4.0, 0.25])}
    got = continual.merge_deltas([a, b], "sum")
    assert torch.equal(got["x"], torch.tensor([-3.0, 2.25])) and torch.equal(got["y"], torch.tensor([[0.5]]))
    got = continual.merge_deltas([a, b], "ties", density=1.0)  # y: only a has it, b's zero has no sign
    # x: entry 0 (1, -4) -> -, -4; entry 1 (2, 0.25) -> +, their mean
    assert torch.equal(got["y"], torch.tensor([[0.5]])) and torch.equal(got["x"], torch.tensor([-4.0, 1.125]))
    with pytest.raises(ValueError, match="merge method"):
        continual.merge_deltas([a], "mean")


def test_merge_of_one_delta_is_that_hotfix():
    base, hot = family(0), family(0)
    with torch.no_grad():
        for i, p in enumerate(hot.model.parameters()):
            if i % 3 == 0:  # some tensors change, the others stay: the delta leaves those out
                p.add_(torch.randn_like(p) * 0.1)
    base_w = dict(base.model.named_parameters())
    delta = continual.weight_delta(dict(hot.model.named_parameters()), base_w)
    n = len(list(hot.model.parameters()))
    assert len(delta) == len(range(0, n, 3))
    restored = family(7)  # other weights: apply_delta sets every parameter
    continual.apply_delta(restored.model, base_w, continual.merge_deltas([delta], "sum"))
    eps = torch.finfo(torch.float32).eps
    for (name, p), q in zip(restored.model.named_parameters(), hot.model.parameters()):
        p, q = p.detach(), q.detach()
        bound = eps * max(float(q.abs().max()), float(base_w[name].detach().abs().max()))  # one rounding of b + (w - b)
        assert float((p - q).abs().max()) <= bound, name
    back = continual.load_delta(continual.save_delta(delta, {"request": "r"}))
    assert back.keys() == delta.keys() and all(torch.equal(back[k], delta[k]) for k in delta)


def test_pull_gradient_is_lambda_times_the_distance():
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 2, generator=g), torch.randn(4, generator=g)]
    anchors = [torch.randn(3, 2, generator=g), torch.randn(4, generator=g)]
    grads = [torch.randn(3, 2, generator=g), torch.randn(4, generator=g)]
    got = continual.add_pull(grads, params, anchors, 0.3)
    for out, gr, p, a in zip(got, grads, params, anchors):
        assert torch.allclose(out, gr + 0.3 * (p - a), rtol=0, atol=1e-7)
    # it is the gradient of lambda/2 ||theta - anchor||^2
    p = params[0].clone().requires_grad_(True)
    (0.3 / 2 * ((p - anchors[0]) ** 2).sum()).backward()
    assert torch.allclose(continual.add_pull([torch.zeros(3, 2)], [params[0]], [anchors[0]], 0.3)[0], p.grad, atol=1e-7)
    with pytest.raises(KeyError, match="no parameter"):
        continual.pull_anchors([("lora_A", params[0])], {"w": params[0]})


class _Still(METHODS["surrogate"]):
    """Zero gradients: the step is the pull alone."""

    def gradients(self, batch, gen, params):
        zeros = [torch.zeros_like(p) for p in params]
        return zeros, [torch.zeros_like(p) for p in params], {}


def test_the_loop_adds_the_pull_to_each_step():
    fam, base = family(0), family(0)
    with torch.no_grad():
        for p in fam.model.parameters():
            p.add_(0.2)  # the hotfix drifted
    before = [p.detach().clone() for p in fam.trainable_parameters()]
    anchors = continual.pull_anchors([(n, p) for n, p in fam.model.named_parameters()],
                                     dict(base.model.named_parameters()))
    cfg = TrainConfig(steps=1, optimizer="sgd", lr=0.5, max_grad_norm=None, device="cpu")
    x = torch.zeros(2, 1, 16, 16)
    method = _Still(load_config().method, fam)
    loop = UnlearnLoop(fam, method, UnlearnData(x, x, x), cfg, pull=(0.1, anchors))
    loop.run(progress=False)
    for p, p0, a in zip(fam.trainable_parameters(), before, anchors):
        assert torch.allclose(p, p0 - 0.5 * 0.1 * (p0 - a), rtol=0, atol=1e-6)  # SGD: theta - lr * lambda (theta - theta0)
    loop = UnlearnLoop(fam, build_method(load_config().method, fam), UnlearnData(x, x, x), cfg)
    assert loop.pull is None  # off unless asked for


def test_remember_target_per_strategy():
    rt = continual.remember_target
    assert [rt("sequential", "auto", s) for s in (True, False)] == ["noise", "noise"]
    assert [rt("anchored", "auto", s) for s in (True, False)] == ["base", "base"]
    assert [rt(k, "auto", s) for k in ("joint", "merge") for s in (True, False)] == ["base", "noise"] * 2
    assert rt("sequential", "base", False) == "base" and rt("anchored", "noise", True) == "noise"  # explicit wins
    with pytest.raises(ValueError, match="unknown continual strategy"):
        rt("stacked", "auto", True)


def test_settings_a_batch_refuses_say_what_to_change():
    from ray_unlearn.requests.process import check_continual

    check_continual(load_config(None, ["continual.strategy=merge"]))  # what the benchmark passes: fine
    with pytest.raises(ConfigError, match="sequential is the unregularised reference"):
        check_continual(load_config(None, ["continual.strategy=sequential", "continual.pull=0.1"]))
    with pytest.raises(ConfigError, match="full-weight training"):
        check_continual(load_config(None, ["continual.pull=0.1", "model.lora.rank=4"]))
    with pytest.raises(ConfigError, match="ddpm family only"):
        check_continual(load_config(None, ["continual.strategy=joint", "model.family=sd3"]))
    with pytest.raises(ConfigError, match="set continual.together=false"):
        check_continual(load_config(None, ["continual.strategy=merge", "continual.together=true"]))
    check_continual(load_config(None, ["continual.strategy=anchored", "continual.together=true"]))
    with pytest.raises(ConfigError, match="set continual.replay_as=forget"):
        check_continual(load_config(None, ["continual.replay_as=hold", "method.name=siss"]))
    check_continual(load_config(None, ["continual.replay_as=hold"]))
    with pytest.raises(ConfigError, match="continual.strategy"):
        load_config(None, ["continual.strategy=stacked"])
    assert load_config().continual.strategy == "anchored"


def test_continual_module_is_pure_torch():
    import ast
    from pathlib import Path

    import ray_unlearn.continual as mod

    tree = ast.parse(Path(mod.__file__).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= {"__future__", "collections", "warnings", "torch", "peft", "safetensors"}, names


# ---- the real processor, each strategy, two requests in two batches -----------------------------------

def _model(tmp_path) -> str:
    return str(tmp_path / "tiny-ddpm")  # the tiny_model_dir fixture's model (conftest.py)


def _overrides(tmp_path, strategy: str, *extra: str) -> list[str]:
    """The tiny model (a test that uses these takes the tiny_model_dir fixture) with tiny settings and
    loosened gates (fixed threshold 0.999, no integrity bound, no specificity rule, no accept margin): the strategies'
    mechanics, not forgetting, are under test; the demo model's figures are the benchmark's."""
    return [f"continual.strategy={strategy}", f"model.path={_model(tmp_path)}", f"cache_dir={tmp_path / 'cache'}",
            "sampler.steps=4", "remember.n=4",
            "surrogate.kind=flip", "train.steps=2", "train.batch_forget=1", "train.batch_remember=2", "train.device=cpu",
            "eval.n_integrity=4", "eval.threshold=fixed", "eval.fixed_threshold=0.999", "eval.min_integrity_ssim=0",
            "eval.specificity_percentile=null", "eval.max_collateral=1", "eval.fid=false", "continual.accept_margin=0",
            *extra]


def _outputs(tmp_path, weights: dict, seeds: list[int]) -> torch.Tensor:
    """The tiny model's outputs for `seeds` with `weights`, sampled as `_overrides` sample."""
    from ray_unlearn.engine import load_family

    fam = load_family(load_config(None, [f"model.path={_model(tmp_path)}", "sampler.steps=4"]), lora=False)
    with torch.no_grad():
        for n, p in fam.model.named_parameters():
            p.copy_(weights[n])
    return fam.generate(fam.initial_noise(seeds)).cpu()


def _submit(store, seed: int) -> str:
    from ray_unlearn.data import save_image
    from ray_unlearn.engine import load_family
    from ray_unlearn.requests import Queue
    from ray_unlearn.storage import open_store

    fam = load_family(load_config(None, [f"model.path={_model(store.parent)}"]), lora=False)
    path = store.parent / f"seed{seed}.png"
    save_image(fam.generate(fam.initial_noise([seed]))[0], path)
    return Queue(open_store(store)).submit(path.read_bytes(), seed=seed)[0].id


def _run(store, tmp_path, overrides):
    from ray_unlearn.requests.process import Processor

    return Processor(str(store), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", model_name="continual",
                     overrides=overrides, train_unproduced=True, retention="keep").run()


def _weights(path) -> dict[str, torch.Tensor]:
    from ray_unlearn.engine import load_family

    fam = load_family(load_config(None, [f"model.path={path}"]), lora=False)
    return {n: p.detach().clone() for n, p in fam.model.named_parameters()}


class _Trainings:
    """engine.train, recording what each training started from."""

    def __init__(self, monkeypatch):
        from ray_unlearn import engine

        self.calls, real = [], engine.train

        def train(prep, *a, **kw):
            self.calls.append({"weights": {n: p.detach().clone() for n, p in prep.family.model.named_parameters()},
                               "seeds": [t.spec.seed for t in prep.targets], "steps": prep.cfg.train.steps,
                               "teacher": prep.teacher is not None, "pull": prep.pull,
                               "remember": prep.cfg.remember.target, "forget_weights": prep.forget_weights,
                               "train_seed": prep.cfg.train.seed,
                               "hold": None if prep.hold is None else (prep.hold[1].clone(), {
                                   n: p.clone() for n, p in prep.hold_teacher.weights().items()}, prep.hold[0].clone())})
            out = real(prep, *a, **kw)
            self.calls[-1]["after"] = {n: p.detach().clone() for n, p in prep.family.model.named_parameters()}
            return out

        monkeypatch.setattr(engine, "train", train)


def _same(a: dict, b: dict, atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["sequential", "anchored", "merge", "merge-ties", "joint"])
def test_each_strategy_two_requests_in_two_batches(strategy, tiny_model_dir, tmp_path, monkeypatch):
    from ray_unlearn.platform.tracking import Registry
    from ray_unlearn.requests import Queue
    from ray_unlearn.storage import open_store

    store = tmp_path / "store"
    trainings = _Trainings(monkeypatch)
    extra = {"anchored": ["continual.pull=0.5"], "merge-ties": ["continual.merge_method=ties"]}.get(strategy, [])
    strategy, method = strategy.split("-")[0], (strategy.split("-") + ["sum"])[1]
    first = _submit(store, 311)
    out1 = _run(store, tmp_path, _overrides(tmp_path, strategy, *extra))
    assert out1.status == "promoted" and out1.version == 1, out1.message
    second = _submit(store, 529)
    out2 = _run(store, tmp_path, _overrides(tmp_path, strategy, *extra))
    assert out2.status == "promoted" and out2.version == 2, out2.message
    q, reg = Queue(open_store(store)), Registry(f"sqlite:///{tmp_path}/mlflow.db", "continual")
    for rid in (first, second):
        e = q.get(rid).evidence
        assert q.get(rid).state == "done" and e["strategy"] == strategy and e["settings"]["continual"]["strategy"] == strategy
    assert {r["id"]: r["forgotten"] for r in out2.reverified} == {first: True, second: True}  # both re-verified
    base = _weights(_model(tmp_path))
    v1, v2 = _weights(reg.get(1).source), _weights(reg.get(2).source)
    t1, t2 = trainings.calls[0], trainings.calls[-1]
    if strategy in ("sequential", "anchored"):  # on top of the serving weights
        assert len(trainings.calls) == 2 and _same(t2["weights"], v1, atol=1e-6) and not _same(v1, base)
        assert t1["remember"] == ("noise" if strategy == "sequential" else "base") and t2["teacher"] == (strategy == "anchored")
        if strategy == "anchored":  # the pull's anchors are the ORIGINAL base's weights, also in the second batch
            lam, anchors = t2["pull"]
            assert lam == 0.5 and all(torch.equal(a, b) for a, b in zip(anchors, base.values()))
        else:
            assert t2["pull"] is None
    elif strategy == "merge":  # each request alone from the base; the hotfix = base + d1 + d2
        assert _same(t1["weights"], base) and _same(t2["weights"], base)
        keys = sorted(open_store(store).list("deltas/"))
        assert [k.split("/")[1] for k in keys] == sorted([first, second]) and len(keys) == 2
        d = {rid: continual.load_delta(open_store(store).get_bytes(q.get(rid).evidence["delta"]["key"]))
             for rid in (first, second)}
        if method == "sum":
            assert _same(v1, {n: base[n] + d[first].get(n, 0) for n in base}, atol=1e-6)
            assert _same(v2, {n: base[n] + d[first].get(n, 0) + d[second].get(n, 0) for n in base}, atol=1e-6)
        else:  # TIES (checked by hand above) of the stored, untrimmed deltas
            m1, m2 = (continual.merge_deltas(ds, "ties", 0.2) for ds in ([d[first]], [d[first], d[second]]))
            assert _same(v1, {n: base[n] + m1.get(n, 0) for n in base}, atol=1e-6)
            assert _same(v2, {n: base[n] + m2.get(n, 0) for n in base}, atol=1e-6)
            assert not _same(v2, {n: base[n] + d[first].get(n, 0) + d[second].get(n, 0) for n in base}, atol=1e-6)
    else:  # joint: the second batch starts from the base and trains on both requests
        assert _same(t2["weights"], base) and t2["seeds"] == [311, 529] and t2["steps"] == 2 * 2
        assert t1["seeds"] == [311] and t1["steps"] == 2
        assert q.get(second).evidence["regenerated_from_seed"] is True and q.get(second).evidence["joint"]["earlier"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["sequential", "anchored", "merge", "joint"])
def test_a_request_that_brings_an_earlier_one_back_is_not_shipped(strategy, tiny_model_dir, tmp_path, monkeypatch):
    """The re-verification after training runs under every strategy (joint and merge hold the earlier
    request in the training set / the delta sum, and still check it); a regression returns the new
    request to pending and nothing ships with it."""
    from ray_unlearn.platform.tracking import Registry
    from ray_unlearn.requests import Queue, batch
    from ray_unlearn.storage import open_store

    store = tmp_path / "store"
    first = _submit(store, 311)
    assert _run(store, tmp_path, _overrides(tmp_path, strategy)).version == 1
    real, seen = batch.judge_checks, []

    def earlier_regresses(checks, *a, **kw):
        rows = real(checks, *a, **kw)
        seen.append([r["id"] for r in rows])
        return [{**r, "forgotten": False, "sscd": 0.9991} if r["id"] == first else r for r in rows]

    monkeypatch.setattr(batch, "judge_checks", earlier_regresses)
    second = _submit(store, 529)
    out = _run(store, tmp_path, _overrides(tmp_path, strategy))
    result = {r["id"]: r for r in out.requests}[second]
    assert seen and all(first in ids for ids in seen)  # re-verified after its training
    assert result["result"] == "returned" and f"brought back {first}" in result["reason"], result
    assert out.status == "nothing-passed" and out.version is None
    reg = Registry(f"sqlite:///{tmp_path}/mlflow.db", "continual")
    assert reg.serving().version == 1 and Queue(open_store(store)).get(second).state == "pending"
    assert not [k for k in open_store(store).list("deltas/") if second in k]  # merge: no delta of it stored


@pytest.mark.slow
def test_merge_refuses_a_lineage_without_deltas(tiny_model_dir, tmp_path):
    """Switching to merge on a lineage built by another strategy stops the batch with what to do."""
    from ray_unlearn.requests import Queue
    from ray_unlearn.storage import open_store

    store = tmp_path / "store"
    _submit(store, 311)
    assert _run(store, tmp_path, _overrides(tmp_path, "anchored")).version == 1
    second = _submit(store, 529)
    out = _run(store, tmp_path, _overrides(tmp_path, "merge"))
    assert out.status == "aborted" and "has no stored delta" in out.message and "anchored or joint" in out.message
    assert Queue(open_store(store)).get(second).state == "pending"


class _Ctx:
    """The parts of a BatchContext that a strategy's start reads."""

    def __init__(self, store=None, images=None):
        from types import SimpleNamespace

        from ray_unlearn.requests.models import RequestError

        def read_image(rid):
            if rid not in (images or {}):
                raise RequestError(f"{rid}: its image was purged; only the record and evidence remain")
            return images[rid]

        self.lineage = SimpleNamespace(chain=lambda: [])
        self.queue = SimpleNamespace(read_image=read_image)
        self.store = store


def _bare_batch(strategy, evidence, ctx, tmp_path, **cfg_over):
    from ray_unlearn.requests.batch import Batch

    b = Batch.__new__(Batch)
    b.strategy, b.earlier_evidence, b.ctx, b.tmp = strategy, evidence, ctx, tmp_path
    b.earlier_specs, b.earlier_ids, b.lineage_deltas, b.deltas = [], [], [], {}
    b.cfg = load_config(None, [f"continual.strategy={strategy}", *cfg_over.get("overrides", [])])
    return b


def test_joint_stops_on_a_seedless_earlier_request_whose_picture_is_gone(tmp_path):
    from ray_unlearn.requests.models import BatchAborted

    b = _bare_batch("joint", {"req-a": {"seed": 5}, "req-b": {"seed": None}}, _Ctx(images={"req-c": b"png"}), tmp_path)
    with pytest.raises(BatchAborted, match="req-b has no seed and its picture was purged.*anchored or merge.*--retention keep"):
        b._start_joint()
    b = _bare_batch("joint", {"req-a": {"seed": 5}, "req-c": {"seed": None}}, _Ctx(images={"req-c": b"png"}), tmp_path)
    b._start_joint()  # a kept picture is enough: the seeded one from its seed, the other from its picture
    assert [s.seed for s in b.earlier_specs] == [5, None] and (tmp_path / "earlier-req-c.png").read_bytes() == b"png"
    assert b.earlier_ids == ["req-a", "req-c"]  # each spec's request, for replay_as=hold's judgement


def test_merge_refuses_a_tampered_delta(tmp_path):
    from ray_unlearn.requests.models import BatchAborted
    from ray_unlearn.storage import open_store

    store = open_store(str(tmp_path / "store"))
    data = continual.save_delta({"w": torch.ones(2)})
    store.put_bytes("deltas/req-a/b1.safetensors", data)
    import hashlib

    ev = {"req-a": {"delta": {"key": "deltas/req-a/b1.safetensors", "sha256": hashlib.sha256(b"other").hexdigest()}}}
    with pytest.raises(BatchAborted, match="does not match its checksum"):
        _bare_batch("merge", ev, _Ctx(store=store), tmp_path)._start_merge()
    ev["req-a"]["delta"]["key"] = "deltas/req-a/missing.safetensors"
    with pytest.raises(BatchAborted, match="cannot be read"):
        _bare_batch("merge", ev, _Ctx(store=store), tmp_path)._start_merge()


def test_merge_checks_the_serving_model_is_base_plus_the_lineage_deltas(tmp_path):
    import hashlib

    from ray_unlearn.requests.models import BatchAborted
    from ray_unlearn.storage import open_store

    store = open_store(str(tmp_path / "store"))
    base = family(0)
    base_w = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    name = next(iter(base_w))
    delta = {name: torch.full_like(base_w[name], 0.01)}
    data = continual.save_delta(delta)
    store.put_bytes("deltas/req-a/b1.safetensors", data)

    def batch(serving_delta, method="sum"):
        ev = {"req-a": {"delta": {"key": "deltas/req-a/b1.safetensors", "sha256": hashlib.sha256(data).hexdigest()},
                        "settings": {"continual": {"merge_method": "sum", "ties_density": 0.2}}}}
        b = _bare_batch("merge", ev, _Ctx(store=store), tmp_path, overrides=[f"continual.merge_method={method}"])
        b.family, b.base_weights = family(0), base_w
        continual.apply_delta(b.family.model, base_w, serving_delta)  # what serves
        return b

    b = batch(delta)
    b._start_merge()  # base + d = serving: builds on it
    assert torch.allclose(dict(b.family.model.named_parameters())[name], base_w[name] + 0.01, rtol=0, atol=1e-7)
    with pytest.raises(BatchAborted, match="not the base \\+ the merge"):
        batch({name: delta[name] * 3})._start_merge()  # something else serves
    b = batch(delta, method="ties")  # another merge method: re-merged (TIES keeps 20% of d), the gates decide
    b._start_merge()
    got = dict(b.family.model.named_parameters())[name].detach() - base_w[name]
    assert int((got.abs() > 1e-4).sum()) == int(0.2 * got.numel())


@pytest.mark.slow
def test_joint_drops_the_newest_request_on_a_shared_gate_and_trains_again_without_it(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    """An integrity failure belongs to the whole joint training: the newest new request goes back to
    pending and the others are trained again without it, so the version holds exactly what is recorded."""
    from ray_unlearn.platform.tracking import Registry
    from ray_unlearn.requests import Queue
    from ray_unlearn.requests.batch import Batch
    from ray_unlearn.storage import open_store

    store = tmp_path / "store"
    ids = [_submit(store, 311), _submit(store, 529)]
    trainings, real = _Trainings(monkeypatch), Batch._verdict

    def integrity_fails_with_both(self, rec, m, sscd_base):
        v = real(self, rec, m, sscd_base)
        if len(trainings.calls[-1]["seeds"]) == 2 and v.kind is None:
            return v._replace(kind="return", reason="integrity gate: (simulated) SSIM below the bound", retriable=False)
        return v

    monkeypatch.setattr(Batch, "_verdict", integrity_fails_with_both)
    out = _run(store, tmp_path, _overrides(tmp_path, "joint"))
    results = {r["id"]: r for r in out.requests}
    newest = max(ids, key=lambda rid: Queue(open_store(store)).get(rid).created_at)
    kept = next(rid for rid in ids if rid != newest)
    assert results[newest]["result"] == "returned" and "dropped, the other 1 trained again" in results[newest]["reason"]
    assert results[kept]["result"] == "done" and out.version == 1
    assert [c["seeds"] for c in trainings.calls] == [[311, 529], [Queue(open_store(store)).get(kept).seed]]
    assert Registry(f"sqlite:///{tmp_path}/mlflow.db", "continual").get(1).tags["requests"] == kept


@pytest.mark.slow
@pytest.mark.parametrize("together", [True, False])
def test_anchored_trains_a_batchs_requests_together_on_the_serving_weights(together, tiny_model_dir, tmp_path,
                                                                           monkeypatch):
    """continual.together: the batch's two new requests train in ONE training on top of the serving
    version, the done request replayed at replay_share and each new one at half the rest, for
    train.steps x 2; false: one after the other, the first (now passed) replayed in the second."""
    from ray_unlearn.platform.tracking import Registry
    from ray_unlearn.requests import Queue
    from ray_unlearn.storage import open_store

    store = tmp_path / "store"
    first = _submit(store, 311)
    assert _run(store, tmp_path, _overrides(tmp_path, "anchored")).version == 1
    trainings = _Trainings(monkeypatch)
    ids = [_submit(store, 529), _submit(store, 733)]
    out = _run(store, tmp_path, _overrides(tmp_path, "anchored", f"continual.together={str(together).lower()}",
                                           "continual.replay_as=forget"))
    assert out.status == "promoted" and out.version == 2, out.message
    q, reg = Queue(open_store(store)), Registry(f"sqlite:///{tmp_path}/mlflow.db", "continual")
    v1 = _weights(reg.get(1).source)
    assert all(q.get(rid).state == "done" for rid in ids) and {r["id"] for r in out.reverified} == {first, *ids}
    assert set(reg.get(2).tags["requests"].split(",")) == set(ids)
    if together:
        [t] = trainings.calls
        assert t["seeds"] == [311, 529, 733] and t["steps"] == 2 * 2 and t["teacher"]
        assert torch.allclose(t["forget_weights"], torch.tensor([0.5, 0.25, 0.25]))
        assert _same(t["weights"], v1, atol=1e-6)  # on top of the serving version, not the base
        for rid in ids:
            e = q.get(rid).evidence
            assert e["together"] == {"earlier": 1, "new": 2, "steps": 4} and e["settings"]["continual"]["together"]
    else:
        t1, t2 = trainings.calls
        assert t1["seeds"] == [311, 529] and t2["seeds"] == [311, 529, 733] and t1["steps"] == t2["steps"] == 2
        assert torch.allclose(t2["forget_weights"], torch.tensor([0.25, 0.25, 0.5]))
        assert _same(t1["weights"], v1, atol=1e-6) and not _same(t2["weights"], v1, atol=1e-6)
        assert all("together" not in q.get(rid).evidence for rid in ids)


@pytest.mark.slow
@pytest.mark.parametrize("retries", [1, 0])
def test_a_request_not_forgotten_tries_again_after_the_rest_of_the_batch(retries, tiny_model_dir, tmp_path, monkeypatch):
    """continual.batch_retries: the first request's first try is (made to be) not forgotten; it tries
    again after the second request, on the weights the second left and with the next train.seed, and
    its evidence keeps why the first try did not pass. With 0 retries it fails with that reason."""
    from ray_unlearn.requests import Queue
    from ray_unlearn.requests.batch import Batch
    from ray_unlearn.storage import open_store

    store = tmp_path / "store"
    ids = [_submit(store, 311), _submit(store, 529)]
    trainings, real, tries = _Trainings(monkeypatch), Batch._verdict, []

    def first_try_not_forgotten(self, rec, m, sscd_base):
        v = real(self, rec, m, sscd_base)
        tries.append(rec.seed)
        if rec.seed == 311 and tries.count(311) == 1:
            return v._replace(kind="fail", reason="not forgotten with these settings: (simulated) SSCD 0.70 -> 0.65",
                              retriable=True)
        return v

    monkeypatch.setattr(Batch, "_verdict", first_try_not_forgotten)
    out = _run(store, tmp_path, _overrides(tmp_path, "anchored", f"continual.batch_retries={retries}",
                                           "continual.replay=false"))
    q = Queue(open_store(store))
    results = {r["id"]: r for r in out.requests}
    assert results[ids[1]]["result"] == "done"
    if retries:
        assert tries == [311, 529, 311] and results[ids[0]]["result"] == "done" and out.version == 1
        e = q.get(ids[0]).evidence
        assert e["earlier_tries"] == ["not forgotten with these settings: (simulated) SSCD 0.70 -> 0.65"]
        assert e["settings"]["continual"]["batch_retries"] == 1 and "earlier_tries" not in q.get(ids[1]).evidence
        seeds = [c["train_seed"] for c in trainings.calls]
        assert seeds == [0, 0, 1]  # the retry draws other noise and batches
        assert _same(trainings.calls[2]["weights"], trainings.calls[1]["after"], atol=1e-6)  # after the second
    else:
        assert tries == [311, 529] and results[ids[0]]["result"] == "failed"
        assert q.get(ids[0]).state == "failed" and "(simulated)" in q.get(ids[0]).reason
        assert "earlier_tries" not in q.get(ids[0]).evidence["last_attempt"]


def test_a_lora_delta_is_the_merged_adapter_on_the_layers_it_adapts():
    """merge with a LoRA: the delta is the adapter merged into the weights, on the adapted layers only."""
    from ray_unlearn.config import LoraSettings

    lora = DDPMFamily(ModelConfig(path="tiny", lora=LoraSettings(rank=2, target_modules=["to_q"])), SamplerConfig(steps=2),
                      unet=tiny_unet(seed=0), scheduler=tiny_scheduler())
    base_w = {n: p.detach().clone() for n, p in family(0).model.named_parameters()}
    with torch.no_grad():
        for n, p in lora.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    delta = continual.weight_delta(dict(lora.merged_unet().named_parameters()), base_w)
    assert delta and all(n.endswith("to_q.weight") for n in delta), sorted(delta)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 50])
    plain = family(3)
    continual.apply_delta(plain.model, base_w, delta)
    assert torch.allclose(plain.predict(x, t), lora.predict(x, t), atol=1e-5)  # base + delta behaves as the LoRA
    anchors = continual.initial_anchors(lora.trainable_parameters())
    assert all(torch.equal(a, p) for a, p in zip(anchors, lora.trainable_parameters()))


@pytest.mark.parametrize("case, retried", [("not_forgotten", True), ("short_of_margin", True), ("brought_back", True),
                                           ("integrity", False), ("collateral", True),
                                           ("integrity_and_collateral", False), ("collateral_and_prompt", False),
                                           ("passes", None)])
def test_which_verdicts_get_another_try_in_the_batch(case, retried):
    """continual.batch_retries retries what another try may mend, judged on the reasons `_verdict`
    really writes: not forgotten, short of the accept margin, an earlier request brought back,
    collateral forgetting with the SSIM inside its bound (which unrelated outputs sit near the
    threshold is partly chance); never an SSIM below its bound (more requests only lower it)."""
    from types import SimpleNamespace

    from ray_unlearn.requests.batch import Batch

    cfg = load_config(None, [])
    me = SimpleNamespace(cfg=cfg, threshold={"value": 0.6}, accept_margin=0.015)
    row = {"sscd_unlearned": {"not_forgotten": 0.65, "short_of_margin": 0.59}.get(case, 0.5),
           "forgotten": case != "not_forgotten", "why": "SSCD not below the threshold" if case == "not_forgotten" else None}
    rows = [{"id": "req-earlier", "sscd": 0.62, "threshold": 0.6, "forgotten": case != "brought_back"}]
    failed = {"collateral": ["collateral"], "integrity_and_collateral": ["ssim", "collateral"],
              "collateral_and_prompt": ["collateral", "prompt_ssim"]}.get(case, [])
    gate = {"ok": not failed, "why": "collateral forgetting 9.4% of unrelated outputs above 5.0%", "failed": failed,
            "collateral": 0.094 if failed else 0.0}
    m = SimpleNamespace(row=row, rows=rows, ssim=0.5 if case.startswith("integrity") else 0.9, train_s=1.0, steps=20,
                        weights_of_step=None, prompts=None, gate=gate)
    rec = SimpleNamespace(id="req-new", prompt=None)
    v = Batch._verdict(me, rec, m, 0.99)
    if retried is None:
        assert v.kind is None and not v.retriable
    else:
        assert v.kind is not None and v.retriable is retried, v.reason


@pytest.mark.slow
@pytest.mark.parametrize("together", [False, True])
def test_anchored_holds_done_requests_where_the_serving_version_has_them(together, tiny_model_dir, tmp_path,
                                                                       monkeypatch):
    """continual.replay_as=hold (hold_margin 0: every done request far enough under): a new request
    trains alone on the forget side; the done request (and, one after another, the one passed earlier
    in the batch) is held: its seed's initial noise, with the weights it trains from as the frozen
    teacher. Every request is still re-verified."""
    from ray_unlearn.engine import load_family
    from ray_unlearn.platform.tracking import Registry
    from ray_unlearn.requests import Queue
    from ray_unlearn.storage import open_store

    store = tmp_path / "store"
    first = _submit(store, 311)
    hold = ["continual.replay_as=hold", "continual.hold_margin=0", f"continual.together={str(together).lower()}"]
    assert _run(store, tmp_path, _overrides(tmp_path, "anchored", *hold)).version == 1
    trainings = _Trainings(monkeypatch)
    ids = [_submit(store, 529), _submit(store, 733)]
    out = _run(store, tmp_path, _overrides(tmp_path, "anchored", *hold))
    assert out.status == "promoted" and out.version == 2, out.message
    q, reg = Queue(open_store(store)), Registry(f"sqlite:///{tmp_path}/mlflow.db", "continual")
    assert all(q.get(rid).state == "done" for rid in ids) and {r["id"] for r in out.reverified} == {first, *ids}
    fam = load_family(load_config(None, [f"model.path={_model(tmp_path)}"]), lora=False)
    v1 = _weights(reg.get(1).source)
    if together:
        [t] = trainings.calls
        assert t["seeds"] == [529, 733] and t["forget_weights"] is None and t["steps"] == 2 * 2
        held = [[311]]
    else:
        t1, t2 = trainings.calls
        assert t1["seeds"] == [529] and t2["seeds"] == [733] and t1["forget_weights"] is None
        held = [[311], [311, 529]]
    for t, seeds in zip(trainings.calls, held):
        noise, teacher, images = t["hold"]
        assert torch.equal(noise, fam.initial_noise(seeds).float())
        assert _same(teacher, t["weights"])  # the teacher is the weights this training starts from
        # the hold images (verify's outputs, not sampled twice) are those weights' outputs
        assert torch.allclose(images, _outputs(tmp_path, t["weights"], seeds), atol=1e-5)
    assert _same(trainings.calls[0]["hold"][1], v1, atol=1e-6)
    if not together:  # the second request's teacher already has the first new one trained in
        assert not _same(trainings.calls[1]["hold"][1], v1, atol=1e-6)
    assert all(q.get(rid).evidence["settings"]["continual"]["replay_as"] == "hold" for rid in ids)


@pytest.mark.slow
def test_a_done_request_near_the_threshold_is_forgotten_again_not_held(tiny_model_dir, tmp_path, monkeypatch):
    """replay_as=hold judges each done request on the weights about to train: one less than hold_margin
    under the threshold joins the forget set again (at replay_share), the others are held."""
    from ray_unlearn.requests import batch

    store = tmp_path / "store"
    first, second = _submit(store, 311), _submit(store, 529)
    assert _run(store, tmp_path, _overrides(tmp_path, "anchored", "continual.batch_retries=0")).version == 1
    real, judged = batch.verify_with_outputs, []

    def verify_with_outputs(family, metrics, checks, bound):  # the first request sits 0.01 under the threshold 0.999
        rows, outputs = real(family, metrics, checks, bound)
        judged.append(sorted(r["id"] for r in rows))
        return [{**r, "sscd": 0.989} if r["id"] == first else {**r, "sscd": 0.5} for r in rows], outputs

    monkeypatch.setattr(batch, "verify_with_outputs", verify_with_outputs)
    monkeypatch.setattr(batch, "verify", lambda *a: verify_with_outputs(*a)[0])
    trainings = _Trainings(monkeypatch)
    _submit(store, 733)
    out = _run(store, tmp_path, _overrides(tmp_path, "anchored", "continual.replay_as=hold", "continual.hold_margin=0.02"))
    assert out.status == "promoted", out.message
    [t] = trainings.calls
    assert judged[1] == sorted([first, second])  # after the batch's start check: both judged before the training
    assert t["seeds"] == [311, 733] and torch.allclose(t["forget_weights"], torch.tensor([0.5, 0.5]))
    noise, _, _ = t["hold"]  # 529, 0.5 under the threshold, is held
    from ray_unlearn.engine import load_family
    fam = load_family(load_config(None, [f"model.path={_model(tmp_path)}"]), lora=False)
    assert torch.equal(noise, fam.initial_noise([529]).float())


@pytest.mark.slow
def test_a_done_request_a_try_brought_back_is_forgotten_again_on_the_retry_not_held(tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    """replay_as=hold with every done request far under (hold_margin 0): the new request's first try
    (made to) bring the first done request back; its retry, after the rest of the batch, trains that
    one again on the forget side (holding it did not hold it) while the other done one stays held;
    so does the next batch, which learns it from the lineage's manifests."""
    from ray_unlearn.engine import load_family
    from ray_unlearn.requests import Queue, batch
    from ray_unlearn.storage import open_store

    store = tmp_path / "store"
    first, second = _submit(store, 311), _submit(store, 529)
    hold = ["continual.replay_as=hold", "continual.hold_margin=0"]
    assert _run(store, tmp_path, _overrides(tmp_path, "anchored", "continual.batch_retries=0", *hold)).version == 1
    real, calls = batch.judge_checks, []

    def first_try_brings_the_first_back(checks, *a, **kw):
        rows = real(checks, *a, **kw)
        calls.append(1)
        return [{**r, "forgotten": False, "sscd": 0.9993} if r["id"] == first and len(calls) == 1 else r for r in rows]

    monkeypatch.setattr(batch, "judge_checks", first_try_brings_the_first_back)
    trainings = _Trainings(monkeypatch)
    new = _submit(store, 733)
    out = _run(store, tmp_path, _overrides(tmp_path, "anchored", "continual.batch_retries=1", *hold))
    assert out.status == "promoted" and out.version == 2, out.message
    try1, try2 = trainings.calls
    fam = load_family(load_config(None, [f"model.path={_model(tmp_path)}"]), lora=False)

    def held(t):  # the seeds whose initial noise the hold set starts from, in any order
        return sorted(s for s in (311, 529) if any(torch.equal(n, fam.initial_noise([s])[0].float()) for n in t["hold"][0]))

    assert try1["seeds"] == [733] and held(try1) == [311, 529] and len(try1["hold"][0]) == 2
    assert try2["seeds"] == [311, 733] and held(try2) == [529] and len(try2["hold"][0]) == 1
    assert try2["forget_weights"].tolist() == pytest.approx([0.5, 0.5])  # replay_share for the one forgotten again
    e = Queue(open_store(store)).get(new).evidence
    assert e["earlier_tries"] == [f"unlearning it brought back {first} (SSCD 0.999 >= 0.999)"], e["earlier_tries"]
    # the next batch reads it from the lineage's manifests: the first is forgotten again from its first try
    trainings.calls.clear()
    _submit(store, 907)
    assert _run(store, tmp_path, _overrides(tmp_path, "anchored", *hold)).version == 3
    [t] = trainings.calls
    assert t["seeds"] == [311, 907] and len(t["hold"][0]) == 2 and held(t) == [529]
