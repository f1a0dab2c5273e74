"""Search spaces are validated up front, with the file and key named."""

import random

import pytest

from ray_unlearn.config import ConfigError, load_config
from ray_unlearn.methods import METHODS
from ray_unlearn.platform.search import to_tune
from ray_unlearn.search_space import load_space, sample


@pytest.mark.parametrize("name", list(METHODS))
def test_shipped_spaces_load_and_sample_valid_configs(name):
    space = load_space(name)
    assert space["method"] == name and "train.lr" in space["space"]
    rng = random.Random(0)
    for _ in range(5):
        point = sample(space, rng)
        cfg = load_config(None, [f"method.name={name}"] + [f"{k}={v}" for k, v in point.items()])
        assert cfg.method.name == name
    tune_space = to_tune(space)
    assert set(tune_space) == set(space["space"])


@pytest.mark.parametrize(
    "body, message",
    [
        ("method: surrogate\nspace:\n  train.lrr: {uniform: [0.1, 0.2]}\n", "train.lrr"),
        ("method: surrogate\nspace:\n  train.lr: {gaussian: [0.1, 0.2]}\n", "unknown distribution 'gaussian'"),
        ("method: surrogate\nspace:\n  train.lr: {uniform: [0.2, 0.1]}\n", "low < high"),
        ("method: surrogate\nspace:\n  train.lr: {loguniform: [0, 0.1]}\n", "loguniform needs low > 0"),
        ("method: surrogate\nspace:\n  surrogate.strength: {uniform: [0.5, 1.5]}\n", "surrogate.strength=1.5 is not a valid"),
        ("method: neggrad\nspace:\n  method.beta: {uniform: [1, 2]}\n", "method.beta=1"),
        ("space: {}\nextra: 1\n", "top-level keys"),
    ],
)
def test_bad_spaces_fail_with_the_key_named(tmp_path, body, message):
    f = tmp_path / "s.yaml"
    f.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_space(f)
    assert message in str(err.value)


def test_unknown_space_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match="shipped: ") as err:
        load_space("magic")
    shipped = str(err.value).split("shipped: ", 1)[1].rstrip(")").split(", ")
    assert set(METHODS) <= set(shipped) and "demo" in shipped
