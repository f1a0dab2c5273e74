"""Train a demo model that ray_unlearn ships: a small UNet2DModel at 32x32.

Two datasets, both offline:
- `--data faces` (RGB): portraits drawn by code (`ray_unlearn.faces`), a pool of `--pool` distinct
  identities drawn from a fixed seed, far more than the model can memorise;
- `--data lfw` (grey): the first 100 entries of `skimage.data.lfw_subset()` (25x25, upsampled).

Cosine schedule, AdamW, EMA, grad clipping. The result is a standard diffusers DDPMPipeline
directory plus training.json:

    python jobs/train_demo_model.py --data faces --pool 20000 --steps 4000 --batch-size 24 --threads 1 --out ray_unlearn/assets/demo-faces32
    python jobs/train_demo_model.py --data lfw --steps 3000 --out ray_unlearn/assets/demo-lfw32
"""

from __future__ import annotations

import argparse
import copy
import math
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from tqdm.auto import tqdm

RESOLUTION = 32


def demo_unet(channels: int = 1) -> UNet2DModel:
    """~3.0M parameters; one attention level at 8x8 is enough for 32 px faces."""
    return UNet2DModel(
        sample_size=RESOLUTION,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(32, 64, 64, 128),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=16,
        attention_head_dim=32,
    )


def demo_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)


def lfw_faces(n: int = 100) -> torch.Tensor:
    from skimage.data import lfw_subset

    faces = torch.from_numpy(lfw_subset()[:n]).float().unsqueeze(1)  # [n,1,25,25] in [0,1]
    return F.interpolate(faces, size=RESOLUTION, mode="bilinear", align_corners=False).clamp(0, 1)


def drawn_faces(n: int, seed: int = 0) -> torch.Tensor:
    from ray_unlearn.faces import portraits

    g = torch.Generator().manual_seed(seed)
    return torch.cat([portraits(min(1000, n - i), RESOLUTION, g) for i in range(0, n, 1000)])


@torch.no_grad()
def sample_grid(unet: UNet2DModel, scheduler: DDPMScheduler, n: int, path: Path) -> None:
    from torchvision.utils import save_image

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(50)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, unet.config.in_channels, RESOLUTION, RESOLUTION, generator=g)
    for t in ddim.timesteps:  # eta=1, the demo's default sampler (see SamplerConfig.eta)
        x = ddim.step(unet(x, t).sample, t, x, eta=1.0, generator=g).prev_sample
    save_image((x + 1) / 2, path, nrow=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", choices=("faces", "lfw"), default="faces")
    ap.add_argument("--pool", type=int, default=20000, help="distinct drawn portraits (--data faces)")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preview-every", type=int, default=1000)
    ap.add_argument("--init", type=Path, default=None, help="Continue from a saved pipeline directory.")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default).")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = (drawn_faces(args.pool, args.seed) if args.data == "faces" else lfw_faces()) * 2 - 1
    unet, scheduler = demo_unet(data.shape[1]), demo_scheduler()
    if args.init is not None:
        unet = UNet2DModel.from_pretrained(args.init, subfolder="unet")
    ema = copy.deepcopy(unet).requires_grad_(False)
    n_params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    # linear warm-up, then cosine decay to 10% (a decayed lr sharpens the samples of a small UNet)
    warm = 0 if args.init is not None else 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(warm, 1)) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    )
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    bar = tqdm(range(args.steps), desc=f"train demo UNet ({n_params / 1e6:.2f}M params)")
    for step in bar:
        idx = torch.randint(0, len(data), (args.batch_size,))
        x0 = data[idx]
        flip = torch.rand(len(x0)) < 0.5  # horizontal flips (double LFW's 100 faces)
        x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        eps = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),))
        loss = F.mse_loss(unet(scheduler.add_noise(x0, eps, t), t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - args.ema_decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if args.preview_every and (step + 1) % args.preview_every == 0:
            sample_grid(ema, scheduler, 32, args.out / f"preview-{step + 1}.png")
    minutes = (time.time() - t0) / 60
    DDPMPipeline(unet=ema, scheduler=scheduler).save_pretrained(args.out, safe_serialization=True)
    sample_grid(ema, scheduler, 64, args.out / "samples.png")
    info = {
        "data": (f"ray_unlearn.faces.portraits: {args.pool} drawn identities (seed {args.seed}), 32x32 RGB, horizontal flips"
                 if args.data == "faces" else "skimage.data.lfw_subset()[:100], 25x25 grey upsampled to 32x32, horizontal flips"),
        "params": n_params,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ema_decay": args.ema_decay,
        "schedule": "DDPM, 1000 steps, squaredcos_cap_v2 (cosine), epsilon prediction",
        "minutes": round(minutes, 1),
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "command": f"python jobs/train_demo_model.py --data {args.data} --steps {args.steps} --batch-size {args.batch_size} "
        f"--lr {args.lr} --out {args.out}",
    }
    (args.out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
