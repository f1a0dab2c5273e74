"""Stable Diffusion 3 pipelines built in code, offline: the tiny ones the tests and the shipped flag
demo use, and the real SD3-medium architecture (random weights, fewer layers if asked) for the
real-scale smoke test and the FLOP count. Nothing here downloads anything.

Width rules the pipeline imposes (diffusers' `StableDiffusion3Pipeline.encode_prompt`): the two CLIP
encoders' hidden states are concatenated and zero-padded to the T5 width (`joint_attention_dim`
when T5 is absent), so their hidden sizes must add up to at most that; their pooled projections
are concatenated and must add up to `pooled_projection_dim`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

BASE_WORDS = ("the", "flag", "of", "a", "photo", "picture", "painting")


def clip_tokenizer(words: Iterable[str], max_length: int = 16) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with a tiny vocabulary: every lowercase letter and digit (so any word
    still tokenizes, letter by letter), plus whole-word tokens for `words`, reached by one chain of
    merges per word (c1+c2, c1c2+c3, ...). Words are lowercased, as CLIP's normaliser does."""
    symbols = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + list(".,'-!?")
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for s in symbols:
        for tok in (s, s + "</w>"):
            vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    seen = set()
    for word in sorted({w.lower() for w in words if w}):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        if any(p.replace("</w>", "") not in symbols for p in pieces):
            raise ValueError(f"tokenizer words take letters, digits and .,'-!? only: '{word}'")
        cur = pieces[0]
        for nxt in pieces[1:]:
            if (cur, nxt) not in seen:
                seen.add((cur, nxt))
                merges.append((cur, nxt))
            cur = cur + nxt
            vocab.setdefault(cur, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = max_length
    return tok


def clip_text_encoder(vocab_size: int, hidden: int, projection: int, max_length: int, seed: int, layers: int = 2):
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        max_position_embeddings=max_length,
        projection_dim=projection,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(cfg).eval()


def tiny_sd3_pipeline(
    words: Iterable[str] = BASE_WORDS,
    *,
    seed: int = 0,
    image_size: int = 32,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 32,
    text_hidden: int = 32,
    vae_blocks: int = 2,
    vae_width: int = 32,
    max_length: int = 16,
    shift: float = 3.0,
) -> StableDiffusion3Pipeline:
    """A tiny SD3 that `StableDiffusion3Pipeline` runs end to end: 16-channel `AutoencoderKL`
    downsampling by 2**(vae_blocks-1), `SD3Transformer2DModel` with patch 2, two CLIP text encoders
    (hidden `text_hidden` each, so joint_attention_dim = 2*text_hidden), no T5. Seeded weights."""
    tok = clip_tokenizer(words, max_length)
    te1 = clip_text_encoder(len(tok), text_hidden, text_hidden, max_length, seed)
    te2 = clip_text_encoder(len(tok), text_hidden, text_hidden, max_length, seed + 1)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
        up_block_types=("UpDecoderBlock2D",) * vae_blocks,
        block_out_channels=tuple(vae_width * min(2, 1 + i) for i in range(vae_blocks)),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=min(32, vae_width),
        sample_size=image_size,
        shift_factor=0.0,
        scaling_factor=1.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    torch.manual_seed(seed + 3)
    latent = image_size // 2 ** (vae_blocks - 1)
    transformer = SD3Transformer2DModel(
        sample_size=latent,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=num_layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=2 * text_hidden,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=2 * text_hidden,
        pos_embed_max_size=latent,
        qk_norm="rms_norm",
    )
    # shift 3.0: SD3-medium's scheduler_config.json (Esser et al. 2024 resolution-dependent shift)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=te1,
        tokenizer=tok,
        text_encoder_2=te2,
        tokenizer_2=tok,
        text_encoder_3=None,
        tokenizer_3=None,
    )


# The published stabilityai/stable-diffusion-3-medium-diffusers configs (transformer/config.json and
# vae/config.json), written out so the real-scale test and the FLOP count need no download.
SD3_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)
SD3_MEDIUM_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# CLIP-L/14 and OpenCLIP bigG/14 widths as SD3-medium's text_encoder / text_encoder_2 configs have them
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280)


def real_sd3_pipeline(num_layers: int = 24, text_layers: int = 1, seed: int = 0, device: str = "cpu") -> StableDiffusion3Pipeline:
    """SD3-medium's architecture with random weights: its transformer config (`num_layers` of its 24
    joint blocks), its VAE config, CLIP encoders of its widths (`text_layers` layers each, the tiny
    tokenizer's vocabulary), no T5. For the real-scale smoke test; nothing is downloaded."""
    tok = clip_tokenizer(BASE_WORDS + ("ireland",), max_length=77)
    encoders = []
    for i, widths in enumerate((CLIP_L, CLIP_G)):
        torch.manual_seed(seed + i)
        cfg = CLIPTextConfig(vocab_size=len(tok), num_hidden_layers=text_layers, max_position_embeddings=77,
                             bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_act="gelu", **widths)
        encoders.append(CLIPTextModelWithProjection(cfg).eval())
    torch.manual_seed(seed + 2)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**{**SD3_MEDIUM_TRANSFORMER, "num_layers": num_layers})
        vae = AutoencoderKL(**SD3_MEDIUM_VAE)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=encoders[0], tokenizer=tok, text_encoder_2=encoders[1], tokenizer_2=tok,
        text_encoder_3=None, tokenizer_3=None,
    )
