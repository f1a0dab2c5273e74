"""The fast verification samplers (DPM-Solver++ 2M, ODE and SDE) keep the integrity pairing exact:
a seed names one output whatever batch it is drawn in, and base and hotfix start from the same noise."""

import pytest
import torch
from conftest import tiny_scheduler, tiny_unet

from ray_unlearn.config import ModelConfig, SamplerConfig
from ray_unlearn.families.ddpm import REFERENCE_DDIM_STEPS, DDPMFamily


def family(kind: str, steps: int = 5, batch_size: int = 2, unet_seed: int = 0) -> DDPMFamily:
    return DDPMFamily(ModelConfig(path="tiny"), SamplerConfig(kind=kind, steps=steps, batch_size=batch_size),
                      unet=tiny_unet(seed=unet_seed), scheduler=tiny_scheduler())


@pytest.mark.parametrize("kind", ["dpmsolver++", "sde-dpmsolver++"])
def test_fast_sampler_is_deterministic_and_batch_independent(kind):
    fam = family(kind)
    noise = fam.initial_noise([3, 4, 5])
    a = fam.generate(noise)  # batches of 2: [3, 4], [5]
    b = torch.cat([fam.generate(noise[i : i + 1]) for i in range(3)])
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(family(kind, batch_size=3).generate(noise), a, atol=1e-5)
    assert a.shape == (3, 1, 16, 16) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(fam.generate(noise), a)
    assert fam.evaluations_per_image() == 5


def test_sde_noise_is_seeded_per_sample_and_differs_from_ode():
    noise = family("dpmsolver++").initial_noise([3, 4])
    ode, sde = family("dpmsolver++").generate(noise), family("sde-dpmsolver++").generate(noise)
    assert not torch.allclose(ode, sde, atol=1e-3)  # the SDE injects noise ...
    assert torch.equal(family("sde-dpmsolver++").generate(noise), sde)  # ... seeded by the sample


def test_pairing_base_and_hotfix_differ_only_by_weights():
    """Same noise, same weights -> the same images; other weights -> other images (the pairing
    compares models, never noise draws)."""
    noise = family("sde-dpmsolver++").initial_noise([7, 8])
    base = family("sde-dpmsolver++").generate(noise)
    assert torch.equal(family("sde-dpmsolver++").generate(noise), base)
    assert not torch.allclose(family("sde-dpmsolver++", unet_seed=1).generate(noise), base, atol=1e-3)


def test_fast_solver_approaches_its_many_step_limit():
    """DPM-Solver++ is a solver of the same ODE as DDIM eta 0: at many steps they meet."""
    noise = family("dpmsolver++").initial_noise([1, 2])
    fam_d = DDPMFamily(ModelConfig(path="tiny"), SamplerConfig(kind="ddim", eta=0.0, steps=100),
                       unet=tiny_unet(), scheduler=tiny_scheduler())
    ref = fam_d.generate(noise)
    err = {n: (family("dpmsolver++", steps=n).generate(noise) - ref).abs().mean().item() for n in (3, 20)}
    assert err[20] < err[3]


def test_sdedit_stays_on_reference_ddim_with_a_fast_sampler():
    fast, ddim = family("dpmsolver++", steps=5), DDPMFamily(
        ModelConfig(path="tiny"), SamplerConfig(kind="ddim", steps=REFERENCE_DDIM_STEPS), unet=tiny_unet(),
        scheduler=tiny_scheduler())
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(fast.sdedit(x, 0.5, 3), ddim.sdedit(x, 0.5, 3))


def test_compiled_sampling_pads_the_last_batch_and_drops_the_padding(monkeypatch):
    """With sampler.compile the last batch is padded to the batch size (one shape, one
    compilation); the outputs are those of uncompiled sampling. torch.compile is replaced by a
    recorder here: what is tested is the shapes the UNet sees and the outputs."""
    shapes = []

    def fake_compile(model):
        def run(x, t):
            shapes.append(len(x))
            return model(x, t)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    noise = family("sde-dpmsolver++").initial_noise([1, 2, 3])
    plain = family("sde-dpmsolver++", batch_size=2).generate(noise)
    fam = DDPMFamily(ModelConfig(path="tiny"), SamplerConfig(kind="sde-dpmsolver++", steps=5, batch_size=2, compile=True),
                     unet=tiny_unet(), scheduler=tiny_scheduler())
    compiled = fam.generate(noise)
    assert set(shapes) == {2} and len(compiled) == 3
    assert torch.allclose(compiled, plain, atol=1e-5)
