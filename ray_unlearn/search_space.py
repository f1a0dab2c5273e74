"""Search spaces (`search_spaces/*.yaml`): what a Tune search explores, validated before any trial.

A file names a method and maps dotted config keys to one distribution each:
    {loguniform: [low, high]} | {uniform: [low, high]} | {int: [low, high]} | {choice: [a, b, ...]}
Every key must be a real config key and every value it can take must validate, so a typo fails
here, with the file and key named, not in trial 7 of 16. The shipped files live in the top-level
`search_spaces/`, installed as the package `ray_unlearn.search_spaces`; the Ray Tune form of a space
is built in the platform layer (`platform.search.to_tune`).
"""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

import yaml

from ray_unlearn.config import ConfigError, load_config

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


def spaces_dir():
    """The shipped search spaces: the installed package `ray_unlearn.search_spaces` (a wheel, or an
    editable install that maps it to search_spaces/), else search_spaces/ beside the package (a
    checkout on sys.path without an install, as a `ray job submit --working-dir .` job sees it)."""
    try:
        return resources.files("ray_unlearn.search_spaces")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "search_spaces"


def shipped_spaces() -> list[str]:
    return sorted(p.name[:-5] for p in spaces_dir().iterdir() if p.name.endswith(".yaml"))


def load_space(path_or_name: str | Path) -> dict:
    """{"method": name, "space": {key: (kind, args)}}; a shipped name (`surrogate`) or a YAML file path."""
    text = str(path_or_name)
    if not Path(text).suffix and text in shipped_spaces():
        where, source = f"{text}.yaml", spaces_dir().joinpath(f"{text}.yaml").read_text()
    elif Path(text).is_file():
        where, source = text, Path(text).read_text()
    else:
        raise ConfigError(f"search space not found: {text!r} is neither a YAML file nor a shipped space "
                          f"(shipped: {', '.join(shipped_spaces())})")
    data = yaml.safe_load(source) or {}
    if not isinstance(data, dict) or set(data) - {"method", "space"} or "space" not in data:
        raise ConfigError(f"{where}: expected top-level keys 'method' and 'space'")
    method = data.get("method", "surrogate")
    space = {}
    for key, spec in (data["space"] or {}).items():
        kind, args = _check_dist(f"{Path(where).name}: {key}", spec)
        for value in _corners(kind, args):  # every edge of the range must make a valid config
            try:
                load_config(None, [f"method.name={method}", f"{key}={value}"])
            except ConfigError as err:
                raise ConfigError(f"{Path(where).name}: {key}={value} is not a valid setting:\n{err}") from None
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
