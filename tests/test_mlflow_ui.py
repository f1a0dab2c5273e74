"""The MLflow UI shows what the platform logs: runs, a trial's integrity grid, the registry, in a
real headless Chromium against `mlflow ui` on a store written by the platform's own Tracker."""

import json

import pytest

from mlflow_ui import chromium, mlflow_ui, pages, render

pytestmark = [pytest.mark.slow, pytest.mark.skipif(chromium() is None, reason="no Chromium (apt-get install chromium)")]


def test_ui_shows_runs_grid_and_registry(tmp_path):
    from PIL import Image

    from ray_unlearn.platform.tracking import Registry, Tracker, version_tags

    db = tmp_path / "mlflow.db"
    tracker = Tracker(f"sqlite:///{db}")
    parent = tracker.start_run("search-ui-check", params={"trials": 1})
    report = {"method": "surrogate", "all_forgotten": True, "passed": True,
              "forget_threshold": {"value": 0.63, "kind": "calibrated"},
              "targets": [{"id": "t", "content_sha256": "ab" * 32, "sscd_base": 1.0, "sscd_unlearned": 0.5,
                           "forgotten": True, "artifact": False}],
              "integrity": {"ssim": 0.8, "fid": 50.0, "min_ssim": 0.6, "ok": True, "n": 32}}
    out = tmp_path / "out"
    out.mkdir()
    Image.new("RGB", (64, 32), (200, 30, 30)).save(out / "integrity_grid.png")
    (out / "report.json").write_text(json.dumps(report))
    child = tracker.start_run("trial-ui-check", parent_run_id=parent, tags={"trial_id": "ui-check"})
    tracker.log_history(child, [{"step": 1, "forget/loss": 0.5}, {"step": 2, "forget/loss": 0.4}])
    tracker.log_report(child, report, out, storage_uri=str(tmp_path / "store"))
    tracker.end_run(child)
    tracker.end_run(parent)
    Registry(f"sqlite:///{db}").register(str(tmp_path / "hotfix"), run_id=child, tags=version_tags(report))

    with mlflow_ui(db) as base:
        where = pages(db)
        runs = render(f"{base}/{where['runs']}")
        assert "search-ui-check" in runs  # the parent run is listed
        grid = render(f"{base}/{where['grid']}", tmp_path / "grid.png")
        assert '<img alt="integrity_grid.png" src="blob:' in grid  # the picture is fetched and shown
        assert (tmp_path / "grid.png").stat().st_size > 10_000
        registry = render(f"{base}/{where['registry']}")
        assert "ray-unlearn-hotfix" in registry
