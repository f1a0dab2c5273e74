"""Every method, on a seeded tiny model: finite losses, every trainable parameter moves, no frozen one."""

import pytest
import torch
from conftest import tiny_scheduler, tiny_unet

from ray_unlearn.config import LoraSettings, ModelConfig, SamplerConfig, TrainConfig, UnlearnConfig
from ray_unlearn.families.ddpm import DDPMFamily
from ray_unlearn.loop import UnlearnData, UnlearnLoop
from ray_unlearn.methods import METHODS, build_method


def make_family(lora: bool = False) -> DDPMFamily:
    cfg = ModelConfig(path="tiny", lora=LoraSettings(rank=2) if lora else None)
    return DDPMFamily(cfg, SamplerConfig(steps=4), unet=tiny_unet(), scheduler=tiny_scheduler())


def make_data(seed: int = 0) -> UnlearnData:
    g = torch.Generator().manual_seed(seed)
    forget = torch.rand(2, 1, 16, 16, generator=g) * 2 - 1
    return UnlearnData(forget, forget.flip(-1), torch.rand(6, 1, 16, 16, generator=g) * 2 - 1)


def method_cfg(name: str):
    return UnlearnConfig.model_validate({"method": {"name": name}}).method


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", list(METHODS))
def test_method_moves_all_trainable_and_no_frozen(name, lora):
    fam = make_family(lora)
    before = {n: p.detach().clone() for n, p in fam.model.named_parameters()}
    trainable = {n for n, p in fam.model.named_parameters() if p.requires_grad}
    loop = UnlearnLoop(fam, build_method(method_cfg(name), fam), make_data(),
                       TrainConfig(steps=3, batch_forget=2, batch_remember=4, lr=1e-3, max_grad_norm=None))
    seen = []
    loop.run(lambda logs, step: seen.append(logs), progress=False)
    assert len(seen) == 3
    for logs in seen:
        assert all(torch.isfinite(torch.tensor(v)) for v in logs.values()), logs
        assert "forget/loss" in logs and "remember/loss" in logs
    changed = {n for n, p in fam.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable, (trainable - changed, changed - trainable)
    if lora:
        assert all("lora_" in n for n in trainable)


def test_loop_is_deterministic_and_resumable():
    def run(steps, state=None):
        fam = make_family()
        loop = UnlearnLoop(fam, build_method(method_cfg("surrogate"), fam), make_data(), TrainConfig(steps=steps, lr=1e-3))
        if state is not None:
            loop.load_state_dict(state)
        loop.run(progress=False)
        return fam, loop

    full, _ = run(4)
    _, half = run(2)
    resumed, _ = run(4, half.state_dict())
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_grad_accum_averages_micro_batches():
    fam = make_family()
    method = build_method(method_cfg("neggrad"), fam)
    loop = UnlearnLoop(fam, method, make_data(), TrainConfig(steps=1, grad_accum=3, lr=1e-3))
    logs = loop.step()
    assert loop.step_count == 1 and torch.isfinite(torch.tensor(logs["remember/loss"]))


def test_surgery_removes_conflict_in_the_step():
    """With surgery the applied direction never opposes the remember gradient."""
    fam = make_family()
    cfg = method_cfg("surrogate").model_copy(update={"surgery": "project_forget"})
    method = build_method(cfg, fam)
    loop = UnlearnLoop(fam, method, make_data(), TrainConfig(steps=1))
    from ray_unlearn import surgery

    for _ in range(5):
        g_f, g_r, _ = method.gradients(loop.batch(), loop.gen, loop.params)
        step, _ = method.combine(g_f, g_r)
        assert float(surgery.dot(step, g_r)) >= -1e-6 * float(surgery.norm_sq(g_r))


def test_bf16_autocast_path_runs_and_auto_is_fp32_on_cpu():
    from ray_unlearn.loop import autocast_dtype

    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    fam = DDPMFamily(ModelConfig(path="tiny"), SamplerConfig(steps=4), dtype_autocast=torch.bfloat16,
                     unet=tiny_unet(), scheduler=tiny_scheduler())
    loop = UnlearnLoop(fam, build_method(method_cfg("surrogate"), fam), make_data(), TrainConfig(steps=2, lr=1e-3))
    logs = loop.run(progress=False)
    assert all(torch.isfinite(torch.tensor(v)) for v in logs.values())
    assert all(p.dtype == torch.float32 for p in loop.params)  # weights stay fp32; only compute is bf16
    img = fam.generate(fam.initial_noise([1]))
    assert img.dtype == torch.float32 and torch.isfinite(img).all()
