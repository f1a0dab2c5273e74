"""Loading paths (local pipeline dir, flat layout, hub id from a local cache), saving, sampling."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import tiny_scheduler, tiny_unet
from diffusers import DDPMPipeline

from ray_unlearn.config import LoraSettings, ModelConfig, SamplerConfig
from ray_unlearn.families.ddpm import DDPMFamily, ModelLoadError, weights_fingerprint


def family(path, lora=None, steps=4, eta=0.0) -> DDPMFamily:
    return DDPMFamily(ModelConfig(path=str(path), lora=lora), SamplerConfig(steps=steps, batch_size=2, eta=eta))


def test_loads_pipeline_dir(tiny_model_dir):
    fam = family(tiny_model_dir)
    assert fam.fingerprint() == weights_fingerprint(tiny_unet())
    assert fam.num_train_timesteps == 100 and fam.size == (16, 16) and fam.channels == 1


def test_loads_flat_layout(tmp_path):
    flat = tmp_path / "flat"
    tiny_unet().save_pretrained(flat)
    tiny_scheduler().save_pretrained(flat)  # scheduler_config.json beside config.json
    assert family(flat).fingerprint() == weights_fingerprint(tiny_unet())


def test_loads_hub_id_from_local_cache(tiny_model_dir, tmp_path, monkeypatch):
    """A hub id resolves offline from the standard HF cache layout (what a pre-seeded cluster has)."""
    hub = tmp_path / "hf" / "hub" / "models--acme--tiny-ddpm"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, hub / "snapshots" / commit)
    (hub / "refs").mkdir(parents=True)
    (hub / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    assert family("acme/tiny-ddpm").fingerprint() == weights_fingerprint(tiny_unet())


def test_shipped_demo_models_load_by_name(monkeypatch):
    """`model.path` takes each shipped name ('demo' is the drawn-faces model); the LFW model is grey,
    the drawn-faces model RGB."""
    from ray_unlearn.families import ddpm

    assert family("demo").fingerprint() == family("demo-faces").fingerprint() != family("demo-lfw").fingerprint()
    faces = family("demo-faces")
    assert faces.channels == 3 and faces.size == (32, 32) and family("demo-lfw").channels == 1
    monkeypatch.setitem(ddpm.DEMO_DIRS, "demo-faces", ddpm.ASSETS / "not-there")
    with pytest.raises(ModelLoadError, match="missing.*train_demo_model.py"):
        family("demo-faces")


def test_missing_model_has_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="could not load a DDPM"):
        family(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers DDPM"):
        family(tmp_path / "empty")


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampling_is_deterministic_and_batch_independent(tiny_model_dir, eta):
    fam = family(tiny_model_dir, eta=eta)
    noise = fam.initial_noise([3, 4, 5])
    assert torch.equal(noise[1], fam.initial_noise([4])[0])  # a seed's noise does not depend on its batch
    a = fam.generate(noise)
    b = torch.cat([fam.generate(noise[i : i + 1]) for i in range(3)])
    assert torch.allclose(a, b, atol=1e-5)
    assert a.shape == (3, 1, 16, 16) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(fam.generate(noise), a)


def test_sdedit_strength_controls_distance(tiny_model_dir):
    fam = family(tiny_model_dir, steps=10)
    x = torch.rand(2, 1, 16, 16)
    assert torch.allclose(fam.sdedit(x, 0.0, 0), x, atol=1e-6)
    weak = (fam.sdedit(x, 0.2, 0) - x).abs().mean()
    strong = (fam.sdedit(x, 0.9, 0) - x).abs().mean()
    assert weak < strong


def test_lora_hotfix_loads_in_plain_diffusers(tiny_model_dir, tmp_path):
    fam = family(tiny_model_dir, lora=LoraSettings(rank=2))
    assert fam.describe()["trainable"] < fam.describe()["params"]
    with torch.no_grad():
        for n, p in fam.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)  # as if trained
    expected = fam.generate(fam.initial_noise([7]))
    out = fam.save(tmp_path / "hotfix")
    assert (tmp_path / "hotfix" / "lora_adapter" / "adapter_config.json").is_file()
    # a separate process with nothing but diffusers (and peft for the adapter)
    code = f"""
import torch, json
from diffusers import DDPMPipeline, UNet2DModel
from peft import PeftModel
pipe = DDPMPipeline.from_pretrained({out['hotfix']!r})
base = UNet2DModel.from_pretrained({str(tiny_model_dir)!r}, subfolder="unet")
with_adapter = PeftModel.from_pretrained(base, {out['adapter']!r}).merge_and_unload()
diff = max((a - b).abs().max().item() for a, b in zip(pipe.unet.parameters(), with_adapter.parameters()))
img = pipe(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
print(json.dumps({{"diff": diff, "shape": list(img.shape)}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["diff"] < 1e-5 and got["shape"] == [1, 16, 16, 1]
    # the merged hotfix reproduces the adapted model's outputs
    merged = family(tmp_path / "hotfix")
    assert torch.allclose(merged.generate(merged.initial_noise([7])), expected, atol=1e-4)


def test_full_hotfix_roundtrip(tiny_model_dir, tmp_path):
    fam = family(tiny_model_dir)
    with torch.no_grad():
        next(fam.model.parameters()).add_(0.1)
    fam.save(tmp_path / "h")
    assert family(tmp_path / "h").fingerprint() == weights_fingerprint(fam.model)
    assert json.loads((tmp_path / "h" / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
