"""Host syncs in the training loop, counted on the CPU: every read of a tensor's value into Python
(`bool`, `float`, `int`, `.item()`, `.tolist()`, `.numpy()`) that the package's own code makes.
On a GPU each one waits for the device to finish the queued work, so a step makes exactly one (the
divergence check, which must run before the optimizer applies the step) and the logs one more,
gathered in a single transfer (`loop.materialize`). Reads inside torch or diffusers are not ours
and not counted."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch

from ray_unlearn import surgery
from ray_unlearn.config import TrainConfig
from ray_unlearn.loop import DivergedError, UnlearnLoop
from ray_unlearn.methods import METHODS, build_method
from test_methods import make_data, make_family, method_cfg

READS = ("__bool__", "__float__", "__int__", "__index__", "item", "tolist", "numpy")


@pytest.fixture
def host_reads(monkeypatch) -> Counter:
    """(read, module, line) -> count, for reads made by ray_unlearn's own frames."""
    seen: Counter = Counter()

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("ray_unlearn"):
                seen[(name, caller, sys._getframe(1).f_lineno)] += 1
            return original(self, *args, **kwargs)
        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    return seen


def make_loop(name: str, steps: int = 3, **train) -> UnlearnLoop:
    fam = make_family()
    cfg = TrainConfig(steps=steps, batch_forget=2, batch_remember=4, lr=1e-3, **train)
    return UnlearnLoop(fam, build_method(method_cfg(name), fam), make_data(), cfg)


@pytest.mark.parametrize("name", list(METHODS))
def test_a_step_reads_the_device_once_and_a_logged_step_twice(name, host_reads):
    loop = make_loop(name, steps=4)
    loop.step()  # warm-up (first-call paths)
    host_reads.clear()
    loop.step()
    assert sum(host_reads.values()) == 1, dict(host_reads)  # the divergence check
    host_reads.clear()
    logs = loop.run(progress=False)  # steps 3 and 4, each logged
    assert sum(host_reads.values()) == 2 * 2, dict(host_reads)  # check + one transfer of the logs
    assert all(isinstance(v, float) for v in logs.values())


@pytest.mark.parametrize("mode", surgery.MODES)
def test_surgery_decides_on_the_device(mode, host_reads):
    g_r = [torch.tensor([1.0, 0.0]), torch.tensor([1.0])]
    for g_f in ([torch.tensor([-1.0, 1.0]), torch.tensor([0.0])],  # conflicting: <g_f, g_r> = -1
                [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]):  # aligned: 4
        host_reads.clear()
        out, logs = surgery.combine(g_f, g_r, mode)
        assert not host_reads, dict(host_reads)
        conflict = float(surgery.dot(g_f, g_r)) < 0
        f = surgery.project_conflict(g_f, g_r) if mode != "none" else g_f
        r = surgery.project_conflict(g_r, g_f) if mode == "pcgrad" else g_r
        for a, b, c in zip(out, f, r):
            assert torch.allclose(a, b + c)
        assert isinstance(logs["surgery/cos"], torch.Tensor) and float(logs["surgery/conflict"]) == float(conflict)
        cos = float(surgery.dot(g_f, g_r) / (surgery.norm_sq(g_f).sqrt() * surgery.norm_sq(g_r).sqrt()))
        assert float(logs["surgery/cos"]) == pytest.approx(cos)
    _, logs = surgery.combine([torch.zeros(2)], [torch.ones(2)], mode)  # a zero gradient: cosine 0, no NaN
    assert float(logs["surgery/cos"]) == 0.0


@pytest.mark.parametrize("where", ["log", "gradient"])
def test_one_read_still_stops_before_a_non_finite_step_is_applied(where):
    loop = make_loop("surrogate", steps=5)
    real = loop.method.gradients
    calls = {"n": 0}

    def gradients(batch, gen, params):  # the second step goes non-finite
        g_f, g_r, logs = real(batch, gen, params)
        calls["n"] += 1
        if calls["n"] == 2:
            if where == "log":
                logs = {**logs, "forget/loss": torch.tensor(float("inf"))}
            else:
                g_f = [g.clone() for g in g_f]
                g_f[-1].view(-1)[0] = float("nan")
        return g_f, g_r, logs

    loop.method.gradients = gradients
    loop.step()
    after_one = [p.detach().clone() for p in loop.params]
    with pytest.raises(DivergedError) as err:
        loop.step()
    e = err.value
    assert e.step == 2 and loop.step_count == 1
    assert (e.kind, e.quantity) == (("inf", "the logged 'forget/loss'") if where == "log"
                                    else ("NaN", "the combined gradient"))
    assert all(torch.equal(p, q) for p, q in zip(loop.params, after_one))  # not applied


def test_the_pull_to_the_base_adds_no_read(host_reads):
    fam = make_family()
    anchors = [p.detach().clone() for p in fam.trainable_parameters()]
    loop = UnlearnLoop(fam, build_method(method_cfg("surrogate"), fam), make_data(),
                       TrainConfig(steps=3, batch_forget=2, batch_remember=4, lr=1e-3), pull=(0.1, anchors))
    loop.step()
    host_reads.clear()
    loop.step()
    assert sum(host_reads.values()) == 1, dict(host_reads)
