"""Seeded tiny models built in code: nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_unet(channels: int = 1, size: int = 16, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=8,
    )


def tiny_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny model saved as a standard diffusers DDPMPipeline directory."""
    from diffusers import DDPMPipeline

    d = tmp_path / "tiny-ddpm"
    DDPMPipeline(unet=tiny_unet(), scheduler=tiny_scheduler()).save_pretrained(d)
    return d
