"""Seeded tiny models built in code: nothing is downloaded."""

from __future__ import annotations

import os
import threading

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


BUCKET = "ray-unlearn-test"


@pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server on 127.0.0.1 (a free port), dummy credentials, one bucket; stopped at the end."""
    import boto3
    from moto.s3.responses import S3Response
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_CONFIG_FILE"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        # moto checks If-None-Match and then stores, without a lock, on a threaded server; real S3
        # decides conditional writes atomically, so make moto do the same for the race tests
        lock = threading.Lock()
        original = S3Response.put_object

        def put_object(self, *a, **kw):
            with lock:
                return original(self, *a, **kw)

        mp.setattr(S3Response, "put_object", put_object)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        mp.setenv("RAY_UNLEARN_S3_ENDPOINT_URL", endpoint)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        try:
            yield endpoint
        finally:
            server.stop()
