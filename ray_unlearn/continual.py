"""Continual unlearning: the weight arithmetic of the batch processor's strategies (pure torch).

Requests keep arriving, and each hotfix built on the last one drifts further from the original
model (utility collapse; Lee et al., "Continual Unlearning for Text-to-Image Diffusion Models: A
Regularization Perspective", arXiv 2511.07970). The strategies (`continual.strategy`, see
ray_unlearn/config.py and docs/requests.md) keep the ORIGINAL base model as the anchor:

- `remember_target`: what the remember term regresses onto under each strategy;
- `pull_anchors` / `add_pull`: the L2 pull toward the base weights, lambda * (theta - theta_base)
  added to each step's gradient (the gradient of lambda/2 * ||theta - theta_base||^2);
- `weight_delta`, `merge_deltas`, `apply_delta`: one task vector per request (its trained weights
  minus the base's), merged by task arithmetic (a sum; Ilharco et al., "Editing Models with Task
  Arithmetic", ICLR 2023) or TIES (Yadav et al., "TIES-Merging", NeurIPS 2023; peft's own
  implementation), and added back onto the base;
- `save_delta` / `load_delta`: a delta as safetensors bytes, for the store.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import torch

STRATEGIES = ("sequential", "anchored", "joint", "merge")
Delta = dict[str, torch.Tensor]


def accept_margin(cfg) -> float:
    """How far under the forget threshold a request's output must end to be done
    (continual.accept_margin; null: half of train.round_margin while train.extra_rounds is on, else 0)."""
    if cfg.continual.accept_margin is not None:
        return cfg.continual.accept_margin
    return cfg.train.round_margin / 2 if cfg.train.extra_rounds > 0 else 0.0


def remember_target(strategy: str, configured: str, uses_surrogate: bool) -> str:
    """What the remember term regresses onto in a batch: 'noise' (the paper's L_r) or 'base' (the
    original base model's prediction, a frozen teacher). An explicit 'noise' / 'base' is kept;
    'auto' resolves per strategy: 'sequential' -> 'noise' for every method (the old, known-collapsing
    reference); 'anchored' -> 'base' for every method; 'joint' and 'merge', which train from the base
    as a single request does -> as for a single request ('base' for the surrogate method, 'noise'
    for the baselines)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown continual strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if configured != "auto":
        return configured
    if strategy == "sequential":
        return "noise"
    if strategy == "anchored":
        return "base"
    return "base" if uses_surrogate else "noise"


def pull_anchors(trainable: Iterable[tuple[str, torch.Tensor]], base: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """The anchor of each trainable parameter, in order: the base's parameter of the same name
    (full-weight training). A name the base does not have (a LoRA adapter's A or B) is a KeyError:
    the caller anchors adapters itself (see `initial_anchors`)."""
    out = []
    for name, p in trainable:
        if name not in base:
            raise KeyError(f"the base model has no parameter {name!r} to pull toward")
        ref = base[name]
        if ref.shape != p.shape:
            raise ValueError(f"parameter {name!r}: shape {tuple(p.shape)} differs from the base's {tuple(ref.shape)}")
        out.append(ref.detach().to(p.device, p.dtype).clone())
    return out


def initial_anchors(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Anchors = the parameters' current values (an adapter that starts from the base: its
    initial value is the base's behaviour, lora_B = 0)."""
    return [p.detach().clone() for p in params]


def add_pull(grads: list[torch.Tensor], params: list[torch.Tensor], anchors: list[torch.Tensor],
             lam: float) -> list[torch.Tensor]:
    """grads + lam * (theta - theta_anchor), per parameter: the gradient of lam/2 * ||theta - anchor||^2
    added to the step's own."""
    if lam == 0:
        return list(grads)
    if not (len(grads) == len(params) == len(anchors)):
        raise ValueError(f"{len(grads)} gradients, {len(params)} parameters, {len(anchors)} anchors")
    return [g + lam * (p.detach() - a).to(g.dtype) for g, p, a in zip(grads, params, anchors)]


def weight_delta(weights: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> Delta:
    """weights - base for every floating-point tensor that differs (an unchanged tensor is left
    out: the delta of a LoRA covers the layers it adapted). Keys must match."""
    if set(weights) != set(base):
        missing, extra = sorted(set(base) - set(weights)), sorted(set(weights) - set(base))
        raise ValueError(f"the weights and the base differ in names (missing {missing[:3]}, extra {extra[:3]})")
    out = {}
    for name, w in weights.items():
        b = base[name]
        if not torch.is_floating_point(w):
            continue
        if w.shape != b.shape:
            raise ValueError(f"{name!r}: shape {tuple(w.shape)} differs from the base's {tuple(b.shape)}")
        if not torch.equal(w, b):
            out[name] = (w.detach().float().cpu() - b.detach().float().cpu()).contiguous()
    return out


def merge_deltas(deltas: list[Delta], method: str = "sum", density: float = 0.2) -> Delta:
    """One delta from several, per tensor: 'sum' (task arithmetic) or 'ties' (per tensor: keep each
    delta's top `density` share of entries by magnitude, elect each entry's sign by the summed
    mass, average the kept entries that agree with it; peft.utils.merge_utils.ties, weights 1). A
    tensor missing from a delta counts as zeros there."""
    if method not in ("sum", "ties"):
        raise ValueError(f"unknown merge method {method!r}; choose 'sum' or 'ties'")
    if not 0 < density <= 1:
        raise ValueError(f"TIES density must be in (0, 1], got {density}")
    names = sorted({n for d in deltas for n in d})
    out = {}
    for name in names:
        ref = next(d[name] for d in deltas if name in d)
        tensors = [d[name].float() if name in d else torch.zeros_like(ref, dtype=torch.float32) for d in deltas]
        if method == "sum":
            merged = tensors[0].clone()
            for t in tensors[1:]:
                merged += t
        else:
            from peft.utils.merge_utils import ties

            with warnings.catch_warnings():  # density 1: peft says it prunes nothing, which is what was asked
                warnings.filterwarnings("ignore", message="The density", category=UserWarning)
                merged = ties(tensors, torch.ones(len(tensors)), density)
        out[name] = merged
    return out


@torch.no_grad()
def apply_delta(model: torch.nn.Module, base: Mapping[str, torch.Tensor], delta: Delta) -> None:
    """Set `model`'s parameters to base + delta (base alone where the delta has no entry)."""
    params = dict(model.named_parameters())
    unknown = sorted(set(delta) - set(params))
    if unknown:
        raise KeyError(f"the delta names parameters the model does not have: {unknown[:3]}")
    for name, p in params.items():
        if name not in base:
            raise KeyError(f"the base has no parameter {name!r}")
        value = base[name].to(p.device, torch.float32)
        if name in delta:
            value = value + delta[name].to(p.device)
        p.copy_(value.to(p.dtype))


def save_delta(delta: Delta, metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in delta.items()}, metadata=metadata)


def load_delta(data: bytes) -> Delta:
    from safetensors.torch import load

    return load(data)
