"""The loop's logs: methods log 0-dim tensors (no host sync per term); reports get floats,
converted in one transfer per report."""

import json

import torch
from conftest import tiny_scheduler, tiny_unet

from ray_unlearn.config import ModelConfig, NegGradConfig, SamplerConfig, TrainConfig
from ray_unlearn.families.ddpm import DDPMFamily
from ray_unlearn.loop import UnlearnData, UnlearnLoop, materialize
from ray_unlearn.methods import build_method


def test_materialize_mixes_floats_and_tensors_in_order():
    out = materialize({"a": torch.tensor(1.5), "b": 2, "c": torch.tensor([3.0]).sum()})
    assert out == {"a": 1.5, "b": 2.0, "c": 3.0} and list(out) == ["a", "b", "c"]
    assert all(type(v) is float for v in out.values())


def test_run_reports_plain_floats():
    fam = DDPMFamily(ModelConfig(path="tiny"), SamplerConfig(steps=2), unet=tiny_unet(), scheduler=tiny_scheduler())
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    data = UnlearnData(x, x.flip(-1), torch.rand(4, 1, 16, 16, generator=g) * 2 - 1)
    loop = UnlearnLoop(fam, build_method(NegGradConfig(), fam), data, TrainConfig(steps=2, batch_forget=2, batch_remember=2))
    step_logs = loop.step()
    assert any(isinstance(v, torch.Tensor) for v in step_logs.values())  # the step itself does not sync
    seen = []
    loop.run(lambda logs, step: seen.append((step, logs)), progress=False)
    assert [s for s, _ in seen] == [2]
    json.dumps(seen)  # a report is plain data: history.json, MLflow
    assert all(type(v) is float for v in seen[0][1].values()) and "grad_norm" in seen[0][1]
