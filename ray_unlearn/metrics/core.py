"""The ``Metrics`` facade: lazy loading, batching, and an honest record of which weights were used."""

from __future__ import annotations

import torch

from . import fid as _fid
from . import lpips_metric as _lp
from . import sscd as _sscd
from ray_unlearn.config import MetricsSettings

from .config import MetricUnavailable
from .images import as_rgb01, batches, check_pair
from .resolve import has_module, resolve_fid, resolve_lpips, resolve_sscd

_SSIM_SOURCE = "torchmetrics structural_similarity_index_measure (gaussian, sigma 1.5, data_range 1; no weights)"


class Metrics:
    """SSCD, LPIPS, SSIM and FID on float NCHW images in [0, 1] (C = 1 or 3).

    Each model loads on first use; a metric whose real weights cannot be found raises
    MetricUnavailable (reason + fix) instead of running with substitutes.
    """

    def __init__(self, cfg: MetricsSettings | None = None, device: str | torch.device = "cpu"):
        self.cfg = cfg if cfg is not None else MetricsSettings()
        self.device = torch.device(device)
        self._models: dict[str, object] = {}
        self._sources: dict[str, str] = {}

    # ---- loading -------------------------------------------------------------------------
    def _get(self, metric: str):
        if metric not in self._models:
            if metric == "sscd":
                resolved = resolve_sscd(self.cfg)
                model, source = _sscd.load_sscd(resolved, self.device), resolved.source
            elif metric == "lpips":
                resolved = resolve_lpips(self.cfg)
                model, source = _lp.load_lpips(resolved, self.cfg.lpips_net, self.device)
            elif metric == "fid":
                resolved = resolve_fid(self.cfg)
                model, source = _fid.load_fid_extractor(resolved, self.device), resolved.source
            else:
                raise KeyError(metric)
            self._models[metric], self._sources[metric] = model, source
        return self._models[metric]

    def _resolve_only(self, metric: str) -> str:
        """Source the metric would use, without loading a model."""
        if metric in self._sources:
            return self._sources[metric]
        if metric == "ssim":
            if not has_module("torchmetrics"):
                raise MetricUnavailable("ssim", "torchmetrics is not installed.", "pip install torchmetrics.")
            return _SSIM_SOURCE
        resolver = {"sscd": resolve_sscd, "lpips": resolve_lpips, "fid": resolve_fid}[metric]
        resolved = resolver(self.cfg)
        if metric == "sscd" and resolved.kind == "onnx" and not has_module("onnxruntime"):
            raise MetricUnavailable("sscd", f"{resolved.path} is ONNX and onnxruntime is not installed.",
                                    "pip install onnxruntime.")
        return resolved.source

    def available(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for metric in ("sscd", "lpips", "ssim", "fid"):
            try:
                out[metric] = {"available": True, "source": self._resolve_only(metric), "reason": None}
            except MetricUnavailable as e:
                out[metric] = {"available": False, "source": None, "reason": str(e)}
        return out

    def sources(self) -> dict[str, str]:
        """Weights actually used so far, per metric (only metrics that have been computed)."""
        return dict(self._sources)

    # ---- SSCD ----------------------------------------------------------------------------
    def sscd_embed(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 512] L2-normalised float32 embeddings on CPU."""
        x = as_rgb01(images)
        model = self._get("sscd")
        out = [_sscd.embed(model, x[s]) for s in batches(len(x), self.cfg.batch_size, "sscd")]
        return torch.cat(out) if out else torch.empty(0, 512)

    def sscd(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of SSCD embeddings of a[i] and b[i]: [N]; ~1 means a copy."""
        a, b = check_pair(a, b)
        return (self.sscd_embed(a) * self.sscd_embed(b)).sum(dim=1)

    # ---- LPIPS ---------------------------------------------------------------------------
    def lpips(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS distance of a[i] to b[i]: [N]; 0 means perceptually identical."""
        a, b = check_pair(a, b)
        model = self._get("lpips")
        side = _lp.MIN_SIDE[self.cfg.lpips_net]
        if min(a.shape[-2:]) < side or a.shape != b.shape:
            raise ValueError(f"LPIPS({self.cfg.lpips_net}) needs equal shapes with sides >= {side}, "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
        out = [_lp.lpips_distance(model, a[s], b[s], self.device)
               for s in batches(len(a), self.cfg.batch_size, "lpips")]
        return torch.cat(out) if out else torch.empty(0)

    # ---- SSIM ----------------------------------------------------------------------------
    def ssim(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image SSIM: [N]; 1 means identical."""
        if not has_module("torchmetrics"):
            raise MetricUnavailable("ssim", "torchmetrics is not installed.", "pip install torchmetrics.")
        from torchmetrics.functional.image import structural_similarity_index_measure as ssim_fn

        a, b = check_pair(a, b)
        if a.shape != b.shape:
            raise ValueError(f"SSIM needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
        # The standard gaussian window (sigma 1.5 -> 11x11; torchmetrics sizes it from sigma and
        # ignores kernel_size). Images under 11 px get the largest odd uniform window that fits.
        k = min(11, *a.shape[-2:])
        k -= 1 - k % 2
        kw = {} if k == 11 else {"gaussian_kernel": False, "kernel_size": k}
        out = [ssim_fn(a[s].to(self.device), b[s].to(self.device), data_range=1.0, reduction="none", **kw)
               .float().cpu().reshape(-1) for s in batches(len(a), self.cfg.batch_size, "ssim")]
        self._sources["ssim"] = _SSIM_SOURCE if not kw else _SSIM_SOURCE + f" [uniform {k}x{k} window: image < 11 px]"
        return torch.cat(out) if out else torch.empty(0)

    # ---- FID -----------------------------------------------------------------------------
    def fid_features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 2048] Inception features on CPU (cache these for a fixed reference set)."""
        x = as_rgb01(images)
        model = self._get("fid")
        out = [model(x[s].to(self.device)).cpu() for s in batches(len(x), self.cfg.batch_size, "fid")]
        return torch.cat(out) if out else torch.empty(0, 2048)

    def fid(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """FID between image sets a and b (each >= 2 images).

        Biased upwards and high-variance at small N: compare only values at the same N and
        resolution; they are not comparable with published (50k-image) FIDs.
        """
        if len(a) < 2 or len(b) < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {len(a)} and {len(b)}")
        return _fid.frechet_distance(self.fid_features(a), self.fid_features(b))
