"""LPIPS (Zhang et al. 2018) built without any download.

The lpips package ships its calibrated linear layers, but its AlexNet/VGG trunk normally comes
from torchvision's download. We build the trunk randomly initialised (pnet_rand=True, which
never downloads) and then overwrite every trunk parameter from the user's torchvision state-dict
file, refusing if any parameter is left unfilled, so random weights can never be used.
"""

from __future__ import annotations

import importlib.metadata
import warnings

import torch

from .config import MetricUnavailable
from .resolve import LPIPS_BACKBONE_FILES, Resolved, file_digest, no_downloads

# Smallest side for which the trunk's pooling stages still have input (AlexNet's fifth stage).
MIN_SIDE = {"alex": 32, "vgg": 16}


def _fix(net: str) -> str:
    return f"use torchvision's {LPIPS_BACKBONE_FILES[net]} (set lpips_backbone_path or put it in $TORCH_HOME/hub/checkpoints/)."


def _load_trunk(model, state: dict, net: str, path) -> None:
    # lpips splits torchvision's `features` Sequential into slice1..5, keeping the index as the
    # child name, so "features.<i>.<param>" maps to the child named "<i>" in one of the slices.
    by_index = {name: mod for sl in model.net.children() for name, mod in sl.named_children()}
    filled = set()
    for key, value in state.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "features":
            continue  # the classifier head is not part of the LPIPS trunk
        mod = by_index.get(parts[1])
        target = getattr(mod, parts[2], None) if mod is not None else None
        if not isinstance(target, torch.Tensor) or target.shape != value.shape:
            raise MetricUnavailable("lpips", f"{path} does not match torchvision's {net} layout at {key}.", _fix(net))
        with torch.no_grad():
            target.copy_(value)
        filled.add(id(target))
    missing = [n for n, p in model.net.named_parameters() if id(p) not in filled]
    if missing:
        raise MetricUnavailable("lpips", f"{path} lacks trunk weights {missing[:3]}... for {net}.", _fix(net))


def load_lpips(resolved: Resolved, net: str, device: torch.device):
    """Returns (model, source) with the source noting whether the file hash is torchvision's."""
    import lpips

    try:
        state = torch.load(resolved.path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise MetricUnavailable("lpips", f"cannot read {resolved.path} as a state dict ({e}).", _fix(net)) from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise MetricUnavailable("lpips", f"{resolved.path} holds a {type(state).__name__}, not a state dict.", _fix(net))

    with no_downloads(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's 'pretrained' deprecation inside lpips
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    _load_trunk(model, state, net, resolved.path)
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)

    # Flag (not block) files that are not torchvision's published weights, e.g. a fine-tuned trunk.
    expected = LPIPS_BACKBONE_FILES[net].rsplit("-", 1)[1].split(".")[0]
    ok = file_digest(resolved.path, "sha256").startswith(expected)
    note = "sha256 matches torchvision's" if ok else f"sha256 does NOT match torchvision's {expected}: not the official weights"
    version = importlib.metadata.version("lpips")
    return model, f"lpips {version} lin layers + {net} trunk from {resolved.source} ({note})"


@torch.inference_mode()
def lpips_distance(model, a: torch.Tensor, b: torch.Tensor, device: torch.device) -> torch.Tensor:
    """a, b: [0,1] RGB NCHW batches -> [N] distances (lpips wants [-1, 1])."""
    d = model(a.to(device) * 2 - 1, b.to(device) * 2 - 1)
    return d.reshape(d.shape[0], -1).mean(dim=1).float().cpu()
