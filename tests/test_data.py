"""Targets from images / seeds / noise files, remember folders, surrogates, the sample cache."""

import numpy as np
import pytest
import torch
from conftest import tiny_scheduler, tiny_unet
from PIL import Image

from ray_unlearn.config import ModelConfig, RememberConfig, SamplerConfig, SurrogateConfig, TargetSpec
from ray_unlearn.data import ImageError, SampleCache, load_image, remember_images, resolve_targets
from ray_unlearn.families.ddpm import DDPMFamily
from ray_unlearn.surrogates import SURROGATES, adaptive_sdedit, make_surrogates, strength_ladder


@pytest.fixture
def fam():
    return DDPMFamily(ModelConfig(path="tiny"), SamplerConfig(steps=3), unet=tiny_unet(), scheduler=tiny_scheduler())


def write_png(path, value, size=(20, 24), mode="RGB"):
    Image.new(mode, size, value).save(path)
    return path


def test_targets_from_image_seed_and_noise_file(fam, tmp_path):
    img = write_png(tmp_path / "face.png", (200, 100, 50))
    noise = fam.initial_noise([11])[0]
    torch.save(noise, tmp_path / "n.pt")
    np.save(tmp_path / "m.npy", noise.numpy())
    specs = [TargetSpec(image=str(img)), TargetSpec(seed=11), TargetSpec(noise=str(tmp_path / "n.pt")),
             TargetSpec(noise=str(tmp_path / "m.npy"))]
    t = resolve_targets(fam, specs)
    assert [x.id for x in t] == ["face", "seed-11", "n", "m"]
    assert t[0].image.shape == (1, 16, 16) and t[0].noise is None  # RGB file -> the model's grey 16x16
    assert abs(float(t[0].image.mean()) - (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 255) < 0.01
    # a seed and the same noise as a file name the same output
    assert torch.allclose(t[1].image, t[2].image, atol=1e-5) and torch.allclose(t[2].image, t[3].image, atol=1e-5)


def test_bad_images_have_clear_errors(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(ImageError, match="is empty"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(tmp_path / "text.png")
    with pytest.raises(ImageError, match="image not found"):
        load_image(tmp_path / "missing.png")
    grey = load_image(write_png(tmp_path / "g.png", 128, mode="L"))
    assert grey.shape == (1, 24, 20)


def test_remember_folder_and_cache(fam, tmp_path):
    folder = tmp_path / "rem"
    folder.mkdir()
    for i in range(3):
        write_png(folder / f"{i}.png", (i * 60, i * 60, i * 60))
    (folder / "notes.txt").write_text("ignored")
    imgs, _ = remember_images(fam, RememberConfig(source="folder", folder=str(folder)), SampleCache(tmp_path / "c"))
    assert imgs.shape == (3, 1, 16, 16)
    with pytest.raises(ImageError, match="no images"):
        remember_images(fam, RememberConfig(source="folder", folder=str(tmp_path)), SampleCache(tmp_path / "c"))
    cache = SampleCache(tmp_path / "c")
    a, hit_a = cache.get_or_generate(fam, [1, 2], "x")
    b, hit_b = cache.get_or_generate(fam, [1, 2], "x")
    assert not hit_a and hit_b and torch.equal(a, b)
    other = DDPMFamily(ModelConfig(path="tiny"), SamplerConfig(steps=4), unet=tiny_unet(), scheduler=tiny_scheduler())
    assert cache.key(other, [1, 2]) != cache.key(fam, [1, 2])  # sampler settings are part of the key
    reseeded = DDPMFamily(ModelConfig(path="tiny"), SamplerConfig(steps=3), unet=tiny_unet(seed=1), scheduler=tiny_scheduler())
    assert cache.key(reseeded, [1, 2]) != cache.key(fam, [1, 2])  # so are the weights


@pytest.mark.parametrize("kind", list(SURROGATES))
def test_surrogates(fam, tmp_path, kind):
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    paths = [str(write_png(tmp_path / f"e{i}.png", 30 * i, mode="L")) for i in range(2)]
    cfg = SurrogateConfig(kind=kind, strength=0.5, paths=paths)
    s1, s2 = make_surrogates(fam, x, cfg), make_surrogates(fam, x, cfg)
    assert s1.shape == x.shape and torch.equal(s1, s2) and 0 <= s1.min() and s1.max() <= 1
    assert not torch.allclose(s1, x)
    if kind == "provided":
        with pytest.raises(ValueError, match="one edited image per target"):
            make_surrogates(fam, x, SurrogateConfig(kind="provided", paths=paths[:1]))


def _mean_gap(a, b):  # a stand-in similarity: 1 - mean |a - b| per pair (the real one is SSCD)
    return 1 - (a - b).abs().flatten(1).mean(1)


def test_adaptive_sdedit_climbs_the_ladder_until_the_surrogate_is_below_the_threshold(fam):
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    # margin 0: the bound built below is the one the ladder compares with (the margin has its own test)
    cfg = SurrogateConfig(strength=0.2, strength_step=0.2, max_strength=1.0, tries=3, margin=0.0)
    assert strength_ladder(cfg) == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert strength_ladder(SurrogateConfig(strength=0.98)) == [0.98]
    per_strength = {s: _mean_gap(x[:1].expand(3, -1, -1, -1), fam.sdedit(x[:1].repeat(3, 1, 1, 1), s, 0)).min().item()
                    for s in strength_ladder(cfg)}
    # a bound between the 0.2 and the strongest edit's similarity: the first strength under it is chosen
    bound = (per_strength[0.2] + min(per_strength.values())) / 2
    want = next(s for s in strength_ladder(cfg) if per_strength[s] < bound)
    out, info = adaptive_sdedit(fam, x, cfg, _mean_gap, bound)
    assert out.shape == x.shape and info[0]["strength"] == want and info[0]["below"]
    assert info[0]["sscd"] == pytest.approx(per_strength[want], abs=1e-4) and 0 <= info[0]["try"] < 3
    assert info[0]["strengths_tried"] == strength_ladder(cfg).index(want) + 1
    # the chosen image is that try of that strength, and the whole thing is deterministic
    cand = fam.sdedit(x[:1].repeat(3, 1, 1, 1), want, 0)
    assert torch.allclose(out[0], cand[info[0]["try"]].float()) and torch.equal(adaptive_sdedit(fam, x, cfg, _mean_gap, bound)[0], out)
    # nothing below the bound: the least similar surrogate tried, flagged, after the whole ladder
    out, info = adaptive_sdedit(fam, x, cfg, _mean_gap, -1.0)
    assert not info[1]["below"] and info[1]["strengths_tried"] == 5
    assert info[1]["sscd"] == pytest.approx(min(
        _mean_gap(x[1:].expand(3, -1, -1, -1), fam.sdedit(x[1:].repeat(3, 1, 1, 1), s, 0)).min().item()
        for s in strength_ladder(cfg)), abs=1e-4)
    # one try at a strength that already passes: plain SDEdit's surrogate for a single target
    one = SurrogateConfig(strength=0.5, tries=1)
    out, info = adaptive_sdedit(fam, x[:1], one, _mean_gap, 2.0)
    assert info[0]["strengths_tried"] == 1 and torch.allclose(out, make_surrogates(fam, x[:1], one))


def test_the_surrogate_margin_lowers_the_bound_the_ladder_must_get_under(fam):
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    cfg = SurrogateConfig(strength=0.2, strength_step=0.2, max_strength=1.0, tries=2, margin=0.0)
    sims = [_mean_gap(x.expand(2, -1, -1, -1), fam.sdedit(x.repeat(2, 1, 1, 1), s, 0)).min().item()
            for s in strength_ladder(cfg)]
    first = sims[0]
    _, (plain,) = adaptive_sdedit(fam, x, cfg, _mean_gap, first + 1e-3)  # the first rung is already under
    margin = first + 1e-3 - min(sims) / 2 - first / 2  # a margin that takes the bound halfway to the lowest
    _, (stricter,) = adaptive_sdedit(fam, x, cfg.model_copy(update={"margin": margin}), _mean_gap, first + 1e-3)
    assert plain["strength"] == 0.2 and plain["strengths_tried"] == 1
    assert stricter["bound"] == pytest.approx(first + 1e-3 - margin, abs=1e-4)
    assert stricter["strength"] > 0.2 and stricter["sscd"] < stricter["bound"]
