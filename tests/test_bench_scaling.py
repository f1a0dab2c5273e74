"""Verification over Ray workers: the scaling benchmark runs the platform's sharded sampling with
1 and 2 workers and the gathered images are the single worker's (sharding never changes an image)."""

import pytest

from ray_unlearn.config import load_config

pytestmark = pytest.mark.slow  # starts Ray and two TorchTrainers: tens of seconds


def test_scaling_benchmark_reports_efficiency_and_identical_images(tiny_model_dir, tmp_path):
    from ray_unlearn.platform.scaling import run_scaling

    cfg = load_config(None, [f"model.path={tiny_model_dir}", "sampler.steps=3", "sampler.batch_size=2",
                             f"cache_dir={tmp_path}", "train.device=cpu"])
    res = run_scaling(cfg, workers=[1, 2], n_samples=5, use_gpu=False)
    for n in (1, 2):
        r = res[f"workers_{n}"]
        assert r["samples_per_s"] == pytest.approx(5 / r["seconds"], rel=0.02)
        assert r["max_abs_diff_vs_fewest"] < 1e-5
    assert res["workers_1"]["scaling_efficiency"] == 1.0
    assert res["workers_2"]["scaling_efficiency"] == pytest.approx(
        res["workers_2"]["samples_per_s"] / (2 * res["workers_1"]["samples_per_s"]), rel=0.02)
