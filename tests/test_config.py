"""Configs: YAML + --set overrides, clear errors for unknown keys and bad values."""

import subprocess
import sys

import pytest

from ray_unlearn.config import ConfigError, load_config
from ray_unlearn.methods import METHODS

# Methods named by what they are, never by a hard-coded name: a new method joins every test.
PAPER_METHOD = next(n for n, m in METHODS.items() if m.uses_surrogate)
BASELINES = [n for n in METHODS if n != PAPER_METHOD]


def _int_knob(name: str) -> str:
    """A method-specific integer setting of `name`'s config (for override tests)."""
    for key, f in METHODS[name].config.model_fields.items():
        if f.annotation is int and key != "name":
            return key
    raise LookupError(name)


def test_defaults_are_the_paper_method():
    cfg = load_config()
    assert cfg.method.name == PAPER_METHOD and cfg.method.surgery == "project_forget"
    assert cfg.model.path == "demo" and cfg.eval.threshold == "calibrated"


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 0.001\n  steps: 5\nsurrogate:\n  strength: 0.8\n")
    other = next(n for n in BASELINES if any(fl.annotation is int for k, fl in METHODS[n].config.model_fields.items()))
    knob = _int_knob(other)
    cfg = load_config(f, ["train.steps=7", f"method.name={other}", f"method.{knob}=3", "targets=[{seed: 4}]"])
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 7 and cfg.surrogate.strength == 0.8
    assert cfg.method.name == other and getattr(cfg.method, knob) == 3
    assert cfg.targets[0].seed == 4 and cfg.targets[0].id == "seed-4"


@pytest.mark.parametrize(
    "override, message",
    [
        (["train.lrr=1"], "train.lrr: Extra inputs are not permitted"),
        (["train.lr=-1"], "train.lr: Input should be greater than 0"),
        (["surrogate.kind=blur"], "'sdedit', 'flip', 'noise' or 'provided'"),
        (["method.name=magic"], "unknown method 'magic'; choose one of: " + ", ".join(METHODS)),
        *[(["method.beta=2", f"method.name={n}", "method.beta=1"], f"method.{n}.beta")
          for n in METHODS if "beta" not in METHODS[n].config.model_fields],
        (["train.steps"], "expects key=value"),
        (["targets=[{}]"], "a target needs an image, a seed or a noise file"),
    ],
)
def test_bad_values_are_clear(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, override)
    assert message in str(err.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("/nonexistent.yaml")


def test_every_method_has_a_config_and_search_space():
    from pathlib import Path

    spaces = Path(__file__).resolve().parent.parent / "search_spaces"
    for name in METHODS:
        assert load_config(None, [f"method.name={name}"]).method.name == name
        assert (spaces / f"{name}.yaml").is_file(), f"search_spaces/{name}.yaml is missing"


def test_config_union_is_built_from_the_registry():
    from typing import get_args

    from ray_unlearn.config import UnlearnConfig

    union = get_args(UnlearnConfig.model_fields["method"].annotation)
    assert set(union) == {m.config for m in METHODS.values()}
    for name, m in METHODS.items():  # each config class lives in its method's module
        assert m.config.__module__ == m.__module__


@pytest.mark.parametrize("name", list(METHODS))
def test_paper_preset_sits_under_yaml_and_set(tmp_path, name):
    preset = METHODS[name].presets["paper"]
    cfg = load_config(None, [f"method.name={name}"], preset="paper")
    assert cfg.preset == "paper"
    for key, value in preset.items():
        section, field = key.split(".", 1)
        assert getattr(getattr(cfg, section), field) == value, key
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 3\n")
    cfg = load_config(f, [f"method.name={name}", "train.lr=0.123"], preset="paper")
    assert cfg.train.steps == 3 and cfg.train.lr == 0.123  # the user's values win over the preset
    f.write_text(f"preset: paper\nmethod:\n  name: {name}\n")  # a YAML can name its preset too
    assert load_config(f).train.steps == preset.get("train.steps", load_config().train.steps)
    assert load_config(None, [f"method.name={name}"], preset="demo") == load_config(None, [f"method.name={name}", "preset=demo"])


def test_paper_presets_follow_the_paper_setup():
    """Paper V-A: NegGrad 10 steps, EraseDiff 60, the paper's method 240 steps at batch 8."""
    steps = {n: load_config(None, [f"method.name={n}"], preset="paper").train for n in METHODS}
    assert steps[PAPER_METHOD].steps == 240 and steps[PAPER_METHOD].batch_forget == 8
    assert {steps[n].steps for n in BASELINES} >= {10, 60}


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'fast' for method .*choose one of: demo, paper"):
        load_config(None, [], preset="fast")


def test_cli_preset_option_reaches_the_config():
    from typer.testing import CliRunner

    from ray_unlearn.cli import app

    res = CliRunner().invoke(app, ["unlearn", "--preset", "nope", "--target-seed", "1"])
    assert res.exit_code == 2 and "unknown preset 'nope'" in res.output
    res = CliRunner().invoke(app, ["methods", "--json"])
    import json

    rows = json.loads(res.output)
    assert list(rows) == list(METHODS) and all("paper" in r["presets"] for r in rows.values())


def test_engine_layers_import_without_ray_mlflow_boto3():
    """Layers 1-2 (pure + model) must not need the platform's libraries."""
    code = (
        "import sys\n"
        "for name in ('ray', 'mlflow', 'boto3', 'botocore'):\n"
        "    sys.modules[name] = None  # makes `import name` fail, as if not installed\n"
        "import ray_unlearn.engine, ray_unlearn.cli, ray_unlearn.methods, ray_unlearn.metrics\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
