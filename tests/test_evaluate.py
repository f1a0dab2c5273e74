"""The judging rules: artifacts never count as forgetting; the threshold says how it was set."""

import torch
import torch.nn.functional as F

from ray_unlearn import evaluate as ev
from ray_unlearn.config import EvalConfig, TargetSpec
from ray_unlearn.data import Target
from ray_unlearn.metrics import Metrics


def faces(n=12):
    from skimage.data import lfw_subset

    x = torch.from_numpy(lfw_subset()[:n]).float().unsqueeze(1)
    return F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1)


def test_high_frequency_energy_separates_texture_from_faces():
    x = faces(8)
    noise = torch.rand(8, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    assert ev.high_frequency_energy(noise).min() > 3 * ev.high_frequency_energy(x).max()


def test_thresholds():
    m = Metrics()
    fixed = ev.calibrate_threshold(EvalConfig(threshold="fixed"), m, faces(4))
    assert fixed["value"] == 0.4 and fixed["kind"] == "fixed"
    cal = ev.calibrate_threshold(EvalConfig(calibration_percentile=90), m, faces(12))
    assert cal["kind"] == "calibrated" and "p90" in cal["source"] and "132 pairs" in cal["source"]
    cal50 = ev.calibrate_threshold(EvalConfig(calibration_percentile=50), m, faces(12))
    assert 0 < cal50["value"] < cal["value"] < 1


def test_artifacts_are_not_forgetting():
    x = faces(6)
    targets = [Target(f"t{i}", x[i], None, TargetSpec(seed=i)) for i in range(2)]
    texture = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    new = torch.cat([x[3:4], texture])  # target 0 -> another face; target 1 -> noise texture
    res = ev.evaluate_outputs(EvalConfig(threshold="fixed", fixed_threshold=0.95, n_integrity=2), Metrics(), targets,
                              x[:2], new, x[2:6], x[2:6], x)
    by_id = {r["id"]: r for r in res["targets"]}
    assert by_id["t0"]["forgotten"] and not by_id["t0"]["artifact"]
    assert by_id["t1"]["below_threshold"] and by_id["t1"]["artifact"] and not by_id["t1"]["forgotten"]
    assert "artifact" in by_id["t1"]["why"]
    assert res["integrity"]["ssim"] == 1.0 and res["integrity"]["ok"]  # identical integrity sets
    assert not res["all_forgotten"] and not res["passed"]
