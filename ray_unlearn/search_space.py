"""Search spaces (`search_spaces/*.yaml`): what a Tune search explores, validated before any trial.

A file names a method and maps dotted config keys to one distribution each:
    {loguniform: [low, high]} | {uniform: [low, high]} | {int: [low, high]} | {choice: [a, b, ...]}
Every key must be a real config key and every value it can take must validate, so a typo fails
here, with the file and key named, not in trial 7 of 16. Ray is imported only by `to_tune`.
"""

from __future__ import annotations

import random
from pathlib import Path

import yaml

from ray_unlearn.config import ConfigError, load_config

SPACES_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
KINDS = ("loguniform", "uniform", "int", "choice")


def _check_dist(where: str, spec) -> tuple[str, list]:
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{where}: expected one of {{{', '.join(KINDS)}: ...}}, got {spec!r}")
    (kind, args), = spec.items()
    if kind not in KINDS:
        raise ConfigError(f"{where}: unknown distribution '{kind}'; choose one of: {', '.join(KINDS)}")
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{where}: {kind} takes a list, e.g. {kind}: [low, high]")
    if kind != "choice":
        if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
            raise ConfigError(f"{where}: {kind} takes [low, high] with low < high, got {args}")
        if kind == "loguniform" and args[0] <= 0:
            raise ConfigError(f"{where}: loguniform needs low > 0, got {args[0]}")
    return kind, args


def _corners(kind: str, args: list) -> list:
    return list(args) if kind == "choice" else [args[0], args[1]]


def load_space(path_or_name: str | Path) -> dict:
    """{"method": name, "space": {key: (kind, args)}}; a bare name reads search_spaces/NAME.yaml."""
    path = Path(path_or_name)
    if not path.suffix:
        path = SPACES_DIR / f"{path_or_name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
        raise ConfigError(f"search space not found: {path} (shipped: {known})")
    data = yaml.safe_load(path.read_text()) or {}
    if set(data) - {"method", "space"} or "space" not in data:
        raise ConfigError(f"{path}: expected top-level keys 'method' and 'space'")
    method = data.get("method", "surrogate")
    space = {}
    for key, spec in (data["space"] or {}).items():
        kind, args = _check_dist(f"{path.name}: {key}", spec)
        for value in _corners(kind, args):  # every edge of the range must make a valid config
            try:
                load_config(None, [f"method.name={method}", f"{key}={value}"])
            except ConfigError as err:
                raise ConfigError(f"{path.name}: {key}={value} is not a valid setting:\n{err}") from None
        space[key] = (kind, args)
    return {"method": method, "space": space}


def sample(space: dict, rng: random.Random) -> dict:
    """One point, without Ray (for tests and grid baselines)."""
    import math

    out = {}
    for key, (kind, args) in space["space"].items():
        if kind == "choice":
            out[key] = rng.choice(args)
        elif kind == "int":
            out[key] = rng.randint(int(args[0]), int(args[1]))
        elif kind == "uniform":
            out[key] = rng.uniform(*args)
        else:
            out[key] = math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))
    return out


def to_tune(space: dict) -> dict:
    """The same space as Ray Tune distributions."""
    from ray import tune

    make = {"loguniform": tune.loguniform, "uniform": tune.uniform,
            "int": lambda lo, hi: tune.randint(int(lo), int(hi) + 1), "choice": lambda *a: tune.choice(list(a))}
    return {key: make[kind](*args) for key, (kind, args) in space["space"].items()}
