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


def test_verdict_rule():
    assert ev.target_verdict(True, False) == (True, None)  # specificity not measured: threshold + artifact
    assert ev.target_verdict(True, False, True) == (True, None)
    assert ev.target_verdict(False, False, True) == (False, "SSCD not below the threshold")
    assert "artifact" in ev.target_verdict(True, True, True)[1]
    forgotten, why = ev.target_verdict(True, False, False)
    assert not forgotten and "not specific" in why


def test_specificity_figures_rank_and_gate_on_hand_written_values():
    cfg = EvalConfig(specificity_percentile=10, max_collateral=0.05, min_integrity_ssim=0.6)
    shift = torch.arange(1, 11, dtype=torch.float64) / 10  # 0.1 .. 1.0
    spec = ev.specificity_figures(cfg, shift, threshold=0.35)
    assert spec["median"] == 0.55 and spec["min"] == 0.1
    assert spec["p10"] == spec["bound"] == 0.19  # numpy linear interpolation: 0.1 + 0.9 * (0.2 - 0.1)
    assert spec["collateral"] == 0.3 and spec["collateral_count"] == 3 and spec["n"] == 10
    t = ev.target_specificity(0.15, spec)
    assert t == {"sscd_base_hotfix": 0.15, "rank": 0.1, "margin": 0.04, "specific": True}
    t = ev.target_specificity(0.19, spec)  # at the bound is not below it
    assert t["specific"] is False and t["margin"] == 0 and t["rank"] == 0.1
    assert ev.target_specificity(0.5, None)["specific"] is None  # not measured
    gate = ev.integrity_gate(cfg, {"ssim": 0.9}, spec)
    assert not gate["ok"] and "collateral forgetting 30.0%" in gate["why"] and gate["failed"] == ["collateral"]
    assert ev.integrity_gate(cfg, {"ssim": 0.1}, spec)["failed"] == ["ssim", "collateral"]
    gate = ev.integrity_gate(cfg, {"ssim": 0.9}, ev.specificity_figures(cfg, shift + 0.3, threshold=0.35))
    assert gate["ok"] and gate["why"] is None and gate["collateral"] == 0.0 and gate["failed"] == []
    gate = ev.integrity_gate(cfg, {"ssim": 0.9}, None)
    assert not gate["ok"] and "not measured" in gate["why"]


def test_global_damage_is_not_specific_forgetting():
    """The target falls below the threshold, but every unrelated output moved further: not
    forgotten, and the gate refuses the collateral forgetting; the same target move with the
    unrelated outputs untouched is forgotten."""
    x = faces(12)
    targets = [Target("t0", x[0], None, TargetSpec(seed=0))]
    blurred = F.avg_pool2d(x[:1], 3, 1, 1)  # a mild change: SSCD ~0.5 at 32 px
    damaged = (x[4:12] + 0.1 * torch.randn(8, 1, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    cfg = EvalConfig(threshold="fixed", fixed_threshold=0.95, n_integrity=8, min_integrity_ssim=0.0, fid=False)
    res = ev.evaluate_outputs(cfg, Metrics(), targets, x[:1], blurred, x[4:12], damaged, x)
    row, spec = res["targets"][0], res["specificity"]
    assert row["below_threshold"] and not row["artifact"]
    assert row["sscd_base_hotfix"] > spec["bound"] and row["specific"] is False and row["margin"] < 0
    assert not row["forgotten"] and "not specific" in row["why"]
    assert spec["collateral"] == 1.0 and not res["integrity"]["ok"] and "collateral" in res["integrity"]["why"]
    assert not res["passed"] and len(spec["values"]) == 8
    assert spec["target_margin"] == row["margin"] and spec["target_rank"] == row["rank"]

    res = ev.evaluate_outputs(cfg, Metrics(), targets, x[:1], blurred, x[4:12], x[4:12], x)
    row = res["targets"][0]
    assert row["specific"] and row["rank"] == 0.0 and row["forgotten"]
    assert res["specificity"]["collateral"] == 0.0 and res["integrity"]["ok"] and res["passed"]


def test_specificity_rule_can_be_turned_off_and_still_reports():
    cfg = EvalConfig(specificity_percentile=None)
    spec = ev.specificity_figures(cfg, torch.arange(1, 11, dtype=torch.float64) / 10, threshold=0.35)
    assert spec["bound"] is None and spec["median"] == 0.55 and spec["collateral"] == 0.3
    t = ev.target_specificity(0.15, spec)
    assert t["rank"] == 0.1 and t["margin"] is None and t["specific"] is None
    assert ev.target_verdict(True, False, t["specific"]) == (True, None)
