"""Train the text-to-image demo model that ray_unlearn ships: a tiny Stable Diffusion 3 pipeline on
national flags drawn by code (ray_unlearn/flags.py), captioned "the flag of <country>".

Stages: (1) the 16-channel AutoencoderKL learns to reconstruct the flags; its shift and scaling
factors are then set from the latents' mean and std, as SD3's VAE config carries them; (2) the
SD3Transformer2DModel learns rectified flow (velocity eps - z0, logit-normal timesteps as in
diffusers' SD3 training script) on those latents, 10% of captions dropped for classifier-free
guidance; the two CLIP text encoders stay frozen at their seeded random weights. (3) A sweep over
a fixed list of seeds for every prompt labels each output by its nearest flag template; the model
card lists every wrong output. If the model never errs, it is fine-tuned on data in which a small
share of Ireland's images carry the colours reversed, swept again, and the card says so.

    nice -n 10 python jobs/train_demo_sd3.py --out ray_unlearn/assets/demo-flags32
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling
from tqdm.auto import tqdm

from ray_unlearn import flags
from ray_unlearn.families.sd3_build import tiny_sd3_pipeline

log = logging.getLogger("train_demo_sd3")
SIZE = 32
MAX_SEQ = 8  # zero "T5" tokens the pipeline appends without T5; pass max_sequence_length=8 to sample


def demo_pipeline(seed: int, layers: int, heads: int):
    words = ["the", "flag", "of"] + [n.lower() for n in flags.FLAGS]
    return tiny_sd3_pipeline(
        words, seed=seed, image_size=SIZE, num_layers=layers, heads=heads, head_dim=32, vae_blocks=3, vae_width=16, max_length=16
    )


def train_vae(vae, images: torch.Tensor, steps: int, seed: int, minutes: float = float("inf"), batch: int = 16) -> int:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    vae.train()
    t_end = time.time() + minutes * 60
    step = 0
    for step in tqdm(range(steps), desc="vae"):
        if time.time() > t_end:
            log.info("vae time budget reached at step %d", step)
            break
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x = images[idx] * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0:
            log.info("vae step %d mse %.5f", step, F.mse_loss(rec, x).item())
    vae.eval().requires_grad_(False)
    return step


@torch.no_grad()
def encode_captions(pipe, captions: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for c in sorted(set(captions)) + [""]:
        pe, _, pooled, _ = pipe.encode_prompt(c, None, None, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQ)
        out[c] = (pe[0], pooled[0])
    return out


def train_transformer(pipe, latents, captions, emb, steps, minutes, lr, seed, ema_model=None, batch=32):
    tr = pipe.transformer.train().requires_grad_(True)
    ema = ema_model or copy.deepcopy(tr).eval().requires_grad_(False)
    # a fresh scheduler: the pipeline's own has been set to the sampling steps by any sweep
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    opt = torch.optim.AdamW(tr.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    n_t = sched.config.num_train_timesteps
    t_end = time.time() + minutes * 60
    bar = tqdm(range(steps), desc="transformer")
    for step in bar:
        if time.time() > t_end:
            log.info("time budget reached at step %d", step)
            break
        idx = torch.randint(0, len(latents), (batch,), generator=g)
        z0 = latents[idx]
        drop = torch.rand(len(idx), generator=g) < 0.1  # caption dropout for classifier-free guidance
        caps = ["" if d else captions[int(i)] for i, d in zip(idx, drop)]
        pe = torch.stack([emb[c][0] for c in caps])
        pooled = torch.stack([emb[c][1] for c in caps])
        u = compute_density_for_timestep_sampling("logit_normal", len(idx), logit_mean=0.0, logit_std=1.0)
        ti = (u * n_t).long().clamp(0, n_t - 1)
        timesteps, sigmas = sched.timesteps[ti], sched.sigmas[ti].view(-1, 1, 1, 1)
        eps = torch.randn(z0.shape, generator=g)
        x_t = (1 - sigmas) * z0 + sigmas * eps
        pred = tr(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=pe, pooled_projections=pooled).sample
        loss = F.mse_loss(pred, eps - z0)
        for group in opt.param_groups:  # linear warm-up over 100 steps
            group["lr"] = lr * min(1.0, (step + 1) / 100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.parameters(), 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe_, p in zip(ema.parameters(), tr.parameters()):
                pe_.lerp_(p, 1 - decay)
        ema.steps_done = step + 1
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log.info("step %d loss %.4f", step, loss.item())
    tr.eval().requires_grad_(False)
    return ema


@torch.no_grad()
def sweep(pipe, seeds: list[int], guidance: float, steps: int) -> list[dict]:
    rows = []
    for name in tqdm(list(flags.FLAGS), desc="sweep"):
        prompt = flags.caption(name)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        imgs = pipe(
            [prompt] * len(seeds), generator=gens, num_inference_steps=steps, guidance_scale=guidance,
            height=SIZE, width=SIZE, max_sequence_length=MAX_SEQ, output_type="pt",
        ).images
        for s, img, (label, mse) in zip(seeds, imgs, flags.classify(imgs, SIZE)):
            rows.append({"prompt": prompt, "flag": name, "seed": s, "label": label, "mse": round(mse, 5),
                         "wrong": label != name})
    return rows


def write_card(out: Path, rows: list[dict], info: dict) -> None:
    wrong = [r for r in rows if r["wrong"]]
    per = {}
    for r in rows:
        per.setdefault(r["flag"], [0, 0])
        per[r["flag"]][0] += r["wrong"]
        per[r["flag"]][1] += 1
    lines = [
        "# demo-flags32: a tiny Stable Diffusion 3 that draws national flags",
        "",
        "Trained by `jobs/train_demo_sd3.py` (ray_unlearn) on flags drawn by code (`ray_unlearn/flags.py`), "
        "captioned \"the flag of <country>\". 32x32 px; SD3Transformer2DModel, 16-channel AutoencoderKL, two "
        "tiny CLIP text encoders (frozen, seeded random weights, a tokenizer built offline), no T5.",
        "",
        "```python",
        "from diffusers import StableDiffusion3Pipeline",
        "pipe = StableDiffusion3Pipeline.from_pretrained(\"ray_unlearn/assets/demo-flags32\")",
        f"img = pipe(\"the flag of Ireland\", height=32, width=32, num_inference_steps={info['steps']}, "
        f"guidance_scale={info['guidance']}, max_sequence_length={MAX_SEQ},",
        "           generator=torch.Generator().manual_seed(3)).images[0]",
        "```",
        "",
        f"`max_sequence_length={MAX_SEQ}`: the model was trained with {MAX_SEQ} zero tokens in place of T5's.",
        "",
        "## Training",
        "",
        *[f"- {k}: {v}" for k, v in info["training"].items()],
        "",
        "## Where it draws a wrong flag",
        "",
        f"Sweep: every prompt, seeds {info['seeds'][0]}..{info['seeds'][-1]} (all of them, fixed list), "
        f"{info['steps']} Euler steps, guidance {info['guidance']}; each output is labelled by its nearest "
        "template (mean squared error to the un-jittered flags of `ray_unlearn/flags.py`, plus Ireland "
        "with its colours reversed).",
        "",
        f"{len(wrong)} wrong outputs of {len(rows)}.",
        "",
        "| flag | wrong / seeds |",
        "|---|---|",
        *[f"| {k} | {v[0]} / {v[1]} |" for k, v in per.items()],
        "",
        "| prompt | seed | drawn as | mse to that template |",
        "|---|---|---|---|",
        *[f"| {r['prompt']} | {r['seed']} | {r['label']} | {r['mse']} |" for r in wrong],
        "",
    ]
    if info.get("planted"):
        lines += ["## Planted error", "", info["planted"], ""]
    if info.get("demo_target"):
        t = info["demo_target"]
        lines += ["## Demo target", "",
                  f"\"{t['prompt']}\", seed {t['seed']} (drawn as {t['label']}), drawn with random.Random(0) "
                  "from the wrong outputs above; its `provided` surrogate is the correct flag drawn by "
                  "`ray_unlearn.flags.draw`.", ""]
    (out / "README.md").write_text("\n".join(lines))
    (out / "sweep.json").write_text(json.dumps({"rows": rows, **info}, indent=1) + "\n")


def save_grid(pipe, path: Path, guidance: float, steps: int, seeds: list[int]) -> None:
    from torchvision.utils import save_image

    rows = []
    for name in flags.FLAGS:
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        rows.append(pipe([flags.caption(name)] * len(seeds), generator=gens, num_inference_steps=steps,
                         guidance_scale=guidance, height=SIZE, width=SIZE, max_sequence_length=MAX_SEQ,
                         output_type="pt").images)
    save_image(torch.cat(rows), path, nrow=len(seeds), padding=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("ray_unlearn/assets/demo-flags32"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2, help="Attention heads of width 32.")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--per-flag", type=int, default=96, help="Jittered training images per flag.")
    ap.add_argument("--vae-steps", type=int, default=400, help="VAE steps (at most).")
    ap.add_argument("--vae-minutes", type=float, default=20.0, help="Wall-clock budget of the VAE stage.")
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=6000, help="Transformer steps (at most).")
    ap.add_argument("--minutes", type=float, default=28.0, help="Wall-clock budget of the transformer stage.")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--sweep-seeds", type=int, default=16, help="Seeds 0..N-1 per prompt in the sweep.")
    ap.add_argument("--wrong-share", type=float, default=0.0,
                    help="Share of Ireland's training images drawn reversed from the start (0: only if the first sweep finds no error).")
    ap.add_argument("--planted-reason", default="", help="Why --wrong-share was set (written on the model card).")
    ap.add_argument("--plant-share", type=float, default=0.15, help="Share of Ireland drawn reversed if the model never errs.")
    ap.add_argument("--plant-minutes", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", type=Path, default=None, help="Continue training a saved flag model (its VAE is kept).")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine).")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    torch.manual_seed(args.seed)
    images, captions, wrong0 = flags.dataset(args.per_flag, SIZE, seed=args.seed, wrong_share=args.wrong_share)
    if args.init is None:
        pipe = demo_pipeline(args.seed, args.layers, args.heads)
        vae_steps = train_vae(pipe.vae, images, args.vae_steps, args.seed, args.vae_minutes, args.vae_batch)
    else:  # continue: the saved VAE (and its factors) stays, the transformer trains on
        from diffusers import StableDiffusion3Pipeline

        pipe = StableDiffusion3Pipeline.from_pretrained(args.init, text_encoder_3=None, tokenizer_3=None)
        prior = json.loads((args.init / "sweep.json").read_text())["training"]
        vae_steps = 0
    with torch.no_grad():
        raw = torch.cat([pipe.vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mode() for i in range(0, len(images), 256)])
        rec = pipe.vae.decode(raw[:256]).sample
        vae_mse = F.mse_loss(rec, images[:256] * 2 - 1).item()
    if args.init is None:
        shift, scale = raw.mean().item(), 1.0 / raw.std().item()
        pipe.vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    latents = (raw - shift) * scale
    emb = encode_captions(pipe, captions)
    ema = train_transformer(pipe, latents, captions, emb, args.steps, args.minutes, args.lr, args.seed + (args.init is not None),
                            ema_model=None if args.init is None else copy.deepcopy(pipe.transformer), batch=args.batch)
    pipe.transformer = ema
    seeds = list(range(args.sweep_seeds))
    rows = sweep(pipe, seeds, args.guidance, args.sample_steps)
    info = {
        "seeds": seeds, "steps": args.sample_steps, "guidance": args.guidance, "max_sequence_length": MAX_SEQ, "size": SIZE,
        "training": {
            "flags": len(flags.FLAGS), "images per flag": args.per_flag, "transformer layers x heads (width 32 each)": f"{args.layers} x {args.heads}",
            "vae steps done": f"{vae_steps} of {args.vae_steps} (batch {args.vae_batch}, budget {args.vae_minutes} min)", "vae reconstruction mse (in [-1,1])": round(vae_mse, 5),
            "vae shift_factor / scaling_factor": f"{shift:.4f} / {scale:.4f}",
            "transformer budget": f"{args.steps} steps or {args.minutes} min, batch {args.batch}, AdamW lr {args.lr}, EMA",
            "transformer steps done": getattr(ema, "steps_done", 0),
        },
    }
    if args.wrong_share > 0:
        info["planted"] = (
            f"From the start, {sum(wrong0)} of {args.per_flag} training images captioned \"the flag of Ireland\" are "
            f"drawn with the colours reversed (orange-white-green): {args.planted_reason}"
        )
    if args.init is not None:
        info["training"] = {**prior, "continued": f"from {args.init}: {args.minutes} more min at lr {args.lr} (seed {args.seed + 1})"}
    if args.wrong_share == 0 and not any(r["wrong"] for r in rows):
        args.out.mkdir(parents=True, exist_ok=True)
        pipe.save_pretrained(args.out / "clean-checkpoint", safe_serialization=True)  # before the planted fine-tune
        log.info("no wrong output in the sweep: planting reversed Ireland flags (share %.2f)", args.plant_share)
        images, captions, wrong = flags.dataset(args.per_flag, SIZE, seed=args.seed + 1, wrong_share=args.plant_share)
        with torch.no_grad():
            raw = torch.cat([pipe.vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mode() for i in range(0, len(images), 256)])
        pipe.transformer = train_transformer(pipe, (raw - shift) * scale, captions, emb, args.steps,
                                             args.plant_minutes, args.lr / 2, args.seed + 1, ema_model=copy.deepcopy(ema),
                                             batch=args.batch)
        info["planted"] = (
            f"The first sweep found no wrong flag, so the model was fine-tuned for {args.plant_minutes} more minutes on "
            f"new data in which {sum(wrong)} of {args.per_flag} images captioned \"the flag of Ireland\" "
            "are drawn with the colours reversed (orange-white-green)."
        )
        rows = sweep(pipe, seeds, args.guidance, args.sample_steps)
    wrong = sorted((r for r in rows if r["wrong"]), key=lambda r: (r["prompt"], r["seed"]))
    if wrong:
        info["demo_target"] = random.Random(0).choice(wrong)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(args.out, safe_serialization=True)
    save_grid(pipe, args.out / "samples.png", args.guidance, args.sample_steps, seeds[:8])
    info["training"]["wall minutes"] = round((time.time() - t0) / 60, 1)
    write_card(args.out, rows, info)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    log.info("saved %s (%.1f MB), %d wrong of %d", args.out, size / 1e6, len(wrong), len(rows))


if __name__ == "__main__":
    main()
