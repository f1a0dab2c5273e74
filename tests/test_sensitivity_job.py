"""jobs/demo_model_sensitivity.py on a tiny model: the pairing is exact (no noise: nothing moves),
large noise moves outputs, a hotfix row is measured like the random ones, and the plot is drawn."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _job():
    spec = importlib.util.spec_from_file_location("sensitivity_job", ROOT / "jobs" / "demo_model_sensitivity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sensitivity_rows_pairing_and_plot(tiny_model_dir, tmp_path):
    job = _job()
    sets = [f"model.path={tiny_model_dir}", "sampler.steps=4", "remember.n=6", f"cache_dir={tmp_path / 'cache'}",
            "eval.fid=false"]
    args = [a for s in sets for a in ("--set", s)]
    res = job.main([*args, "--n", "6", "--sigmas", "0", "3", "--draws", "1", "--hotfix", str(tiny_model_dir),
                    "--out", str(tmp_path / "out")])
    still, loud, same = res["rows"]
    assert still["rel_change"] == 0 and still["ssim"] > 0.999 and still["collateral"] == 0 and still["median_sscd"] > 0.999
    assert loud["rel_change"] > 1 and loud["ssim"] < still["ssim"] and loud["median_sscd"] < still["median_sscd"]
    assert same["kind"] == "hotfix" and same["rel_change"] == 0 and same["ssim"] > 0.999  # the base itself as "hotfix"
    saved = json.loads((tmp_path / "out" / "sensitivity.json").read_text())
    assert saved["rows"] == res["rows"] and saved["n"] == 6
    png = tmp_path / "s.png"
    job.main(["--plot", str(tmp_path / "out" / "sensitivity.json"), "--out", str(png)])
    assert png.stat().st_size > 1000
    two = tmp_path / "two.png"  # one series per labelled model; a label per file or a clear refusal
    f = str(tmp_path / "out" / "sensitivity.json")
    job.main(["--plot", f, f, "--labels", "model A", "model B", "--out", str(two)])
    assert two.stat().st_size > 1000
    with pytest.raises(SystemExit, match="one label per results file"):
        job.main(["--plot", f, f, "--labels", "only one", "--out", str(two)])
