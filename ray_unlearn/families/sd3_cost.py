"""What one LoRA unlearning step costs on the full SD3-medium transformer, counted on the meta device.

FLOPs: torch's `FlopCounterMode` around a forward and backward of the real architecture (2.0 B
parameters, 24 joint blocks) with LoRA adapters on diffusers' SD3 training targets, on meta tensors
(no memory, no weights). Memory: the bytes of the weights, of every tensor autograd saves for the
backward pass (`saved_tensors_hooks`; on meta, attention runs unfused, so the N x N attention matrices are
counted apart: a fused kernel on a GPU never stores them), and of the LoRA gradients and AdamW moments. Counted, not
guessed; what a real run adds on top (allocator slack, CUDA context, the VAE and text encoders) is not.

    python -m ray_unlearn.families.sd3_cost --resolution 1024 --batch 1
"""

from __future__ import annotations

import argparse
import json

import torch

from ray_unlearn.families.sd3_build import SD3_MEDIUM_TRANSFORMER


def lora_step_cost(resolution: int = 1024, batch: int = 1, rank: int = 8, text_tokens: int = 77 * 1 + 256,
                   dtype: torch.dtype = torch.bfloat16, num_layers: int | None = None) -> dict:
    """One training step of the forget (or remember) term: forward + backward through the
    transformer with LoRA rank `rank`. `text_tokens`: CLIP's 77 plus T5's 256 (diffusers' default)."""
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from ray_unlearn.families.sd3 import SD3_LORA_TARGETS

    cfg = dict(SD3_MEDIUM_TRANSFORMER)
    if num_layers is not None:
        cfg["num_layers"] = num_layers
    with torch.device("meta"):
        tr = SD3Transformer2DModel(**cfg).to(dtype)
        tr.requires_grad_(False)
        tr.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=SD3_LORA_TARGETS))
    tr.to(dtype)
    lora = [p for p in tr.parameters() if p.requires_grad]
    side = resolution // 8  # SD3's VAE downsamples by 8
    x = torch.empty(batch, cfg["in_channels"], side, side, device="meta", dtype=dtype)
    ctx = torch.empty(batch, text_tokens, cfg["joint_attention_dim"], device="meta", dtype=dtype)
    pooled = torch.empty(batch, cfg["pooled_projection_dim"], device="meta", dtype=dtype)
    t = torch.empty(batch, device="meta", dtype=dtype)
    n_tokens = (side // cfg["patch_size"]) ** 2 + text_tokens
    saved = attn = 0

    def pack(tensor):
        nonlocal saved, attn
        if not isinstance(tensor, torch.nn.Parameter):
            nbytes = tensor.numel() * tensor.element_size()
            saved += nbytes
            if tensor.dim() >= 2 and tuple(tensor.shape[-2:]) == (n_tokens, n_tokens):
                attn += nbytes  # attention matrices: what a flash / memory-efficient kernel never stores
        return tensor

    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = tr(hidden_states=x, timestep=t, encoder_hidden_states=ctx, pooled_projections=pooled).sample
        fwd = counter.get_total_flops()
        out.float().pow(2).mean().backward()
    total = counter.get_total_flops()
    n_all = sum(p.numel() for p in tr.parameters())
    n_lora = sum(p.numel() for p in lora)
    elt = torch.empty((), dtype=dtype).element_size()
    weights = n_all * elt
    grads_opt = n_lora * (elt + 2 * 4)  # LoRA gradients in the weights' dtype, AdamW moments in fp32
    gib = 1024**3
    return {
        "architecture": "SD3-medium transformer" + (f" ({cfg['num_layers']} layers)" if num_layers else ""),
        "resolution": resolution, "batch": batch, "image_tokens": (side // cfg["patch_size"]) ** 2,
        "text_tokens": text_tokens, "dtype": str(dtype).replace("torch.", ""), "lora_rank": rank,
        "params": n_all, "lora_params": n_lora,
        "forward_tflop": round(fwd / 1e12, 3), "forward_backward_tflop": round(total / 1e12, 3),
        "weights_gib": round(weights / gib, 3), "saved_activations_gib": round(saved / gib, 3),
        "of_which_attention_matrices_gib": round(attn / gib, 3),
        "lora_grads_and_adamw_gib": round(grads_opt / gib, 4),
        # a frozen teacher (replay_as=hold's serving teacher, remember.target=base in a run): FrozenWeights
        # copies what trains, the adapter; a deep copy would be a second transformer
        "frozen_teacher_gib": round(n_lora * elt / gib, 4), "frozen_teacher_as_deep_copy_gib": round(weights / gib, 3),
        "total_gib": round((weights + saved + grads_opt) / gib, 3),
        "total_with_fused_attention_gib": round((weights + saved - attn + grads_opt) / gib, 3),
        "note": "one forward+backward (one loss term); the surrogate method runs two per step (forget and "
        "remember). Saved activations count every tensor autograd keeps, a tensor saved by two ops twice.",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--layers", type=int, default=None, help="Fewer joint blocks (default: all 24).")
    args = ap.parse_args()
    print(json.dumps(lora_step_cost(args.resolution, args.batch, args.rank, num_layers=args.layers), indent=2))


if __name__ == "__main__":
    main()
