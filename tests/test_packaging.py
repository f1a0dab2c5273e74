"""The built wheel (not the checkout): what it carries, and that an install of it finds its search
spaces and demo model from outside the repository."""

from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import procs
import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "ray_unlearn", "search_spaces")


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    res = procs.run(cmd, timeout=timeout, stderr=subprocess.STDOUT, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} exited {res.returncode}:\n{res.stdout[-4000:]}"
    return res


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the project's sources (so no build/ or egg-info lands in the
    checkout, and nothing stale from an earlier build gets in)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    # the venv's own setuptools: no download, the same build backend the editable install used
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
         timeout=300)
    (whl,) = out.glob("ray_unlearn-*.whl")
    return whl


def _names(whl: Path) -> set[str]:
    with zipfile.ZipFile(whl) as z:
        return set(z.namelist())


def test_wheel_carries_every_module_the_search_spaces_and_the_demo_model(wheel):
    names = _names(wheel)
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "ray_unlearn").rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(modules - names)
    assert not missing, f"not in the wheel: {missing} (a new subpackage? list it in pyproject.toml's packages)"
    spaces = {f"ray_unlearn/search_spaces/{p.name}" for p in (REPO / "search_spaces").glob("*.yaml")}
    assert spaces and spaces <= names
    assets = {p.relative_to(REPO).as_posix() for p in (REPO / "ray_unlearn" / "assets").rglob("*") if p.is_file()}
    assert any(a.endswith(".safetensors") for a in assets) and assets <= names
    assert "ray_unlearn/__main__.py" in names


def test_wheel_carries_no_tests_jobs_or_stale_modules(wheel):
    names = _names(wheel)
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"ray_unlearn", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    assert not [n for n in names if "/tests/" in n or n.startswith(("tests/", "jobs/")) or "__pycache__" in n]
    # every module in the wheel has its source in the checkout (nothing removed lives on in it)
    shipped = {n for n in names if n.endswith(".py") and not n.startswith("ray_unlearn/search_spaces/")}
    assert {n for n in shipped if not (REPO / n).is_file()} == set()


def test_wheel_metadata_entry_point_and_dependencies(wheel):
    with zipfile.ZipFile(wheel) as z:
        info = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_string(z.read(info).decode())
        entry = z.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "ray-unlearn = ray_unlearn.cli:app" in entry
    requires = meta.get_all("Requires-Dist")
    runtime = {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].strip() for r in requires if "extra ==" not in r}
    assert {"torch", "diffusers", "ray", "mlflow", "boto3", "optuna"} <= runtime
    assert not runtime & {"accelerate", "scikit-image", "pytest", "moto"}, "tools of tests or demo training at runtime"
    assert any(r.startswith("scikit-image") and 'extra == "train-demo"' in r for r in requires)


def test_installed_wheel_runs_from_outside_the_checkout(wheel, tmp_path):
    """The wheel's copy (not the checkout) is imported, finds its spaces by name, and
    `python -m ray_unlearn` answers. The dependencies come from this venv."""
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(target), str(wheel)],
         timeout=300)
    user_space = tmp_path / "mine.yaml"
    user_space.write_text("method: surrogate\nspace:\n  train.lr: {loguniform: [1.0e-5, 1.0e-4]}\n")
    script = (
        "import ray_unlearn, ray_unlearn.search_spaces as s\n"
        "from ray_unlearn.search_space import load_space, shipped_spaces\n"
        "from ray_unlearn.families.ddpm import DEMO_DIR\n"
        "print(ray_unlearn.__file__); print(ray_unlearn.__version__); print(s.__file__)\n"
        "print(','.join(shipped_spaces())); print(load_space('surrogate')['method'])\n"
        f"print(sorted(load_space({str(user_space)!r})['space']))\n"
        "print(DEMO_DIR.is_relative_to(__import__('pathlib').Path(ray_unlearn.__file__).parent), (DEMO_DIR / 'model_index.json').is_file())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1"}
    out = _run([sys.executable, "-c", script], timeout=120, cwd=tmp_path, env=env).stdout.splitlines()
    assert Path(out[0]).is_relative_to(target), f"imported {out[0]}, not the wheel's copy"
    assert out[1] == "0.1.0" or out[1][0].isdigit()
    assert Path(out[2]).is_relative_to(target)
    assert set(out[3].split(",")) == {p.stem for p in (REPO / "search_spaces").glob("*.yaml")}
    assert out[4] == "surrogate" and out[5] == "['train.lr']" and out[6] == "True True"
    help_text = _run([sys.executable, "-m", "ray_unlearn", "--help"], timeout=120, cwd=tmp_path, env=env).stdout
    assert "search" in help_text and "demo" in help_text
