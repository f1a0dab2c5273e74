"""The sd3 family on tiny seeded SD3 pipelines built in code (ray_unlearn/families/sd3_build.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ray_unlearn import diffusion
from ray_unlearn.config import LoraSettings, ModelConfig, SamplerConfig, SD3Settings, TrainConfig
from ray_unlearn.families.sd3 import LORA_FILE, SD3_LORA_TARGETS, SD3Family, load_sd3_pipeline
from ray_unlearn.families.sd3_build import tiny_sd3_pipeline
from ray_unlearn.loop import UnlearnData, UnlearnLoop
from ray_unlearn.methods import build_method
from ray_unlearn.methods.surrogate import SurrogateMethodConfig

PROMPT = "the flag of ireland"
WORDS = ("the", "flag", "of", "ireland", "italy")


def tiny_pipe(seed: int = 0):
    return tiny_sd3_pipeline(WORDS, seed=seed, image_size=32, num_layers=2, heads=2, vae_blocks=2, max_length=8)


def make_family(pipe=None, path: str = "tiny", lora: LoraSettings | None = None, full: bool = False, steps: int = 3):
    cfg = ModelConfig(family="sd3", path=path, lora=lora,
                      sd3=SD3Settings(prompt=PROMPT, max_sequence_length=4, guidance_scale=3.0, full_finetune=full))
    return SD3Family(cfg, SamplerConfig(steps=steps, batch_size=4), pipe=pipe or tiny_pipe())


@pytest.fixture(scope="module")
def fam():
    return make_family()


def test_velocity_and_surrogate_velocity_on_exact_values(fam):
    T = fam.num_train_timesteps
    t = torch.tensor([0.25 * (T - 1)])  # sigma = 1/4
    x_f, x_s, eps = torch.full((1, 2), 1.0), torch.full((1, 2), 0.5), torch.full((1, 2), -1.0)
    x_t = fam.add_noise(x_f, eps, t)
    assert torch.equal(x_t, torch.full((1, 2), 0.5))  # 0.75*1 + 0.25*(-1)
    assert torch.equal(fam.target(x_f, eps, t), torch.full((1, 2), -2.0))  # v = eps - z0
    v_s = fam.surrogate_target(x_f, x_s, eps, t)
    assert torch.equal(v_s, torch.zeros(1, 2))  # (x_t - z_s)/sigma = (0.5 - 0.5)/0.25
    # the same identity on random values: one Euler step x_t - sigma*v_s lands on the surrogate,
    # and v_s = v + (z_f - z_s)/sigma (it grows like 1/sigma as sigma -> 0)
    g = torch.Generator().manual_seed(0)
    x_f, x_s, eps = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    t = torch.tensor([0.1, 0.5, 0.9]) * (T - 1)
    s = fam.sigma(t).view(-1, 1, 1, 1)
    v_s = fam.surrogate_target(x_f, x_s, eps, t)
    torch.testing.assert_close(fam.add_noise(x_f, eps, t) - s * v_s, x_s)
    torch.testing.assert_close(v_s, fam.target(x_f, eps, t) + (x_f - x_s) / s)


def test_timesteps_follow_the_scheduler_shift_and_weight_is_in_sigma(fam):
    T = fam.num_train_timesteps
    t = fam.sample_timesteps(4000, torch.Generator().manual_seed(0))
    s = fam.sigma(t)
    assert s.min() >= fam._shifted(torch.tensor(1.0 / T)) - 1e-6 and s.max() <= 1.0
    # shift 3 pushes sigma up: P(sigma < 0.5) = P(u < 1/(shift+1)) = 0.25
    assert abs(float((s < 0.5).float().mean()) - 0.25) < 0.03
    t_min = fam.sample_timesteps(500, torch.Generator().manual_seed(1), t_min=600)
    assert float(fam.sigma(t_min).min()) >= 600 / (T - 1) - 1e-6
    w = diffusion.forget_weight(t, T, "beta", beta=2.0)
    torch.testing.assert_close(w, s**2)  # lambda_t in sigma: sigma^beta


def test_noise_coefficients_and_vp_equivalent(fam):
    t = torch.tensor([0.0, 0.3, 0.7, 1.0]) * (fam.num_train_timesteps - 1)
    a, s = fam.noise_coefficients(t)
    torch.testing.assert_close(a, 1 - fam.sigma(t))
    ab = fam.alpha_bar(t)
    snr_rf, snr_vp = a**2 / s.clamp(min=1e-12) ** 2, ab / (1 - ab).clamp(min=1e-12)
    torch.testing.assert_close(snr_rf[1:3], snr_vp[1:3])
    assert float(ab[0]) == 1.0 and float(ab[-1]) == 0.0


def test_encode_decode_round_trip_shapes(fam):
    imgs = torch.rand(3, 3, 20, 20)
    x = fam.prepare_images(imgs)
    assert x.shape == (3, 3, 32, 32)
    z = fam.encode(x)
    assert z.shape == (3, 16, 16, 16)
    out = fam.decode(z)
    assert out.shape == (3, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    # the VAE's shift and scaling factors are applied: raw latents = z / scale + shift
    vae = fam.pipe.vae
    vae.register_to_config(shift_factor=0.5, scaling_factor=2.0)
    try:
        torch.testing.assert_close(fam.encode(x), (z - 0.5) * 2.0)
    finally:
        vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)


def test_generate_matches_the_plain_pipeline(fam):
    """A seed names the same output in ray_unlearn and in plain diffusers (CFG, Euler, same latents)."""
    ours = fam.generate(fam.initial_noise([5, 9]))
    pipe = fam.pipe
    ref = pipe([PROMPT] * 2, generator=[torch.Generator().manual_seed(s) for s in (5, 9)], num_inference_steps=3,
               guidance_scale=3.0, height=32, width=32, max_sequence_length=4, output_type="pt").images
    torch.testing.assert_close(ours, ref.float(), atol=1e-4, rtol=0)
    other = fam.generate(fam.initial_noise([5]), prompt="the flag of italy")
    assert not torch.allclose(other, ours[:1], atol=1e-3)  # the prompt conditions the output


def test_condition_indexes_like_the_samples(fam):
    cond = fam.condition([PROMPT, "the flag of italy", PROMPT])
    assert cond["prompt_embeds"].shape[0] == 3 and cond["pooled_prompt_embeds"].shape == (3, 64)
    x = torch.randn(3, 16, 16, 16)
    t = torch.full((3,), 500.0)
    with torch.no_grad():
        by_cond = fam.predict(x, t, cond=cond)
        by_default = fam.predict(x, t)
    torch.testing.assert_close(by_cond[[0, 2]], by_default[[0, 2]])
    assert not torch.allclose(by_cond[1], by_default[1])
    picked = {k: v[torch.tensor([1])] for k, v in cond.items()}  # loop.batch indexes it like the samples
    with torch.no_grad():
        torch.testing.assert_close(fam.predict(x[1:2], t[1:2], cond=picked), by_cond[1:2])


def test_sdedit_is_deterministic_and_prompted(fam):
    img = fam.generate(fam.initial_noise([1]))
    a = fam.sdedit(img, 0.6, seed=3)
    b = fam.sdedit(img, 0.6, seed=3)
    assert a.shape == (1, 3, 32, 32) and torch.equal(a, b)
    with fam.editing("the flag of italy"):
        c = fam.sdedit(img, 0.6, seed=3)
    assert not torch.allclose(a, c, atol=1e-3)
    torch.testing.assert_close(fam.sdedit(img, 0.0, seed=3), img)


def _unlearn(family, steps=3):
    imgs = family.generate(family.initial_noise([1, 2, 3]))
    data = UnlearnData(family.encode(imgs[:1]), family.encode(imgs[:1].flip(-1)), family.encode(imgs[1:]))
    method = build_method(SurrogateMethodConfig(), family)
    UnlearnLoop(family, method, data, TrainConfig(steps=steps, batch_forget=1, batch_remember=2, lr=1e-2)).run(progress=False)


def test_lora_is_the_default_and_only_adapters_train():
    family = make_family()
    assert family.lora is not None and sorted(family.lora.target_modules) == sorted(SD3_LORA_TARGETS)
    trainable = {n for n, p in family.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in family.model.named_parameters()}
    frozen = [family.pipe.vae, family.pipe.text_encoder, family.pipe.text_encoder_2]
    frozen_before = [{n: p.detach().clone() for n, p in m.named_parameters()} for m in frozen]
    _unlearn(family)
    moved = {n for n, p in family.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)
    for m, snap in zip(frozen, frozen_before):
        assert all(torch.equal(p, snap[n]) for n, p in m.named_parameters())


def test_full_finetune_trains_the_transformer():
    family = make_family(full=True)
    assert family.lora is None
    assert all(p.requires_grad for p in family.model.parameters())


def test_unknown_lora_targets_are_a_clear_error():
    from ray_unlearn.families.ddpm import ModelLoadError

    with pytest.raises(ModelLoadError, match="to_q"):
        make_family(lora=LoraSettings(target_modules=["conv_nonexistent"]))


_LOAD = r"""
import json, sys, torch
from diffusers import StableDiffusion3Pipeline
base, hotfix, out = sys.argv[1:4]
pipe = StableDiffusion3Pipeline.from_pretrained(base, text_encoder_3=None, tokenizer_3=None)
pipe.load_lora_weights(hotfix)
img = pipe("the flag of ireland", generator=torch.Generator().manual_seed(5), num_inference_steps=3,
           guidance_scale=3.0, height=32, width=32, max_sequence_length=4, output_type="pt").images
torch.save(img, out)
"""


@pytest.mark.slow
def test_hotfix_is_a_diffusers_lora_that_plain_diffusers_loads(tmp_path):
    base_dir = tmp_path / "base"
    tiny_pipe(seed=4).save_pretrained(base_dir)
    family = make_family(load_sd3_pipeline(str(base_dir)), path=str(base_dir))
    _unlearn(family, steps=4)
    ours = family.generate(family.initial_noise([5]))
    saved = family.save(tmp_path / "hotfix")
    assert (tmp_path / "hotfix" / LORA_FILE).is_file()
    assert json.loads((tmp_path / "hotfix" / "ray_unlearn_base.json").read_text())["path"] == str(base_dir.resolve())
    out = tmp_path / "img.pt"
    subprocess.run([sys.executable, "-c", _LOAD, str(base_dir), saved["hotfix"], str(out)], check=True)
    theirs = torch.load(out, weights_only=True).float()
    torch.testing.assert_close(theirs, ours, atol=2e-3, rtol=0)
    with family.base_model():
        base_out = family.generate(family.initial_noise([5]))
    assert (base_out - ours).abs().max() > 1e-3  # the LoRA changed the output it loads as
    # ray_unlearn loads the hotfix directory as a model path (base + fused LoRA)
    again = make_family(load_sd3_pipeline(saved["hotfix"]), path=saved["hotfix"])
    torch.testing.assert_close(again.generate(again.initial_noise([5])), ours, atol=2e-3, rtol=0)


def test_loop_batches_carry_conditions_indexed_like_the_samples(fam):
    prompts = [PROMPT, "the flag of italy", "the flag of ireland italy"]
    z = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 16, 16, 16).clone()
    data = UnlearnData(z, z.clone(), z.clone(), forget_cond=fam.condition(prompts), remember_cond=fam.condition(prompts))
    loop = UnlearnLoop(fam, build_method(SurrogateMethodConfig(), fam), data, TrainConfig(batch_forget=5, batch_remember=5))
    b = loop.batch()
    for part in ("forget", "remember"):
        rows = b[part]["x0"][:, 0, 0, 0].long()
        for key in ("prompt_embeds", "pooled_prompt_embeds"):
            assert torch.equal(b[part]["cond"][key], data.forget_cond[key][rows])


def test_lora_rank_alone_keeps_the_sd3_targets():
    family = make_family(lora=LoraSettings(rank=4))
    assert family.lora.rank == 4 and sorted(family.lora.target_modules) == sorted(SD3_LORA_TARGETS)


def test_hold_on_sd3_with_a_lora_keeps_the_serving_adapter_as_teacher_and_trains_only_the_adapter():
    """continual.replay_as=hold on the sd3 family with a LoRA: the hold set is the serving model's
    latent output for each done seed, the teacher a frozen copy of the serving adapter (only the
    adapter is copied) that training leaves untouched, and a loop step with hold samples moves only the adapter."""
    from types import SimpleNamespace

    from ray_unlearn.config import TargetSpec
    from ray_unlearn.engine import hold_set

    f = make_family(lora=LoraSettings(rank=2))
    prep = SimpleNamespace(family=f, hold=None, hold_teacher=None)
    assert hold_set(prep, [TargetSpec(seed=3, prompt=PROMPT)]) == 1
    images, noise = prep.hold
    assert images.shape[0] == 1 and torch.equal(noise, f.initial_noise([3]).float().cpu())
    assert prep.hold_teacher.frozen and all("lora" in n for n in prep.hold_teacher.frozen)  # the adapter, not a transformer
    teacher = {n: p.clone() for n, p in prep.hold_teacher.weights().items()}
    x = f.encode(torch.rand(4, 3, 32, 32)).cpu()
    data = UnlearnData(x[:1], x[:1].flip(-1), x, hold=f.encode(images.to(f.device)).cpu(), hold_noise=noise)
    method = build_method(SurrogateMethodConfig(), f)
    method.hold_teacher = prep.hold_teacher
    before = {n: p.detach().clone() for n, p in f.model.named_parameters()}
    logs = UnlearnLoop(f, method, data, TrainConfig(steps=1, batch_forget=1, batch_remember=2, lr=1e-3)).step()
    assert "hold/mse" in logs and torch.isfinite(torch.as_tensor(logs["hold/mse"]))
    moved = {n for n, p in f.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora" in n for n in moved)
    assert all(torch.equal(p, teacher[n]) for n, p in prep.hold_teacher.weights().items())
