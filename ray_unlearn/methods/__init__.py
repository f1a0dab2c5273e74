"""Unlearning methods, picked by name from one explicit dict. Adding one: its module (config class,
`Method` subclass, presets), one line here, its search space in search_spaces/, a README row;
config.py builds the config union from this dict."""

from ray_unlearn.methods.base import Method
from ray_unlearn.methods.erasediff import EraseDiff
from ray_unlearn.methods.neggrad import NegGrad
from ray_unlearn.methods.siss import SISS
from ray_unlearn.methods.surrogate import SurrogateMethod

METHODS: dict[str, type[Method]] = {
    "surrogate": SurrogateMethod,
    "neggrad": NegGrad,
    "erasediff": EraseDiff,
    "siss": SISS,
}

# each registered method names itself and its config class consistently (checked at import)
for _name, _cls in METHODS.items():
    assert _cls.name == _name and _cls.config.model_fields["name"].default == _name, _name


def build_method(cfg, family) -> Method:
    return METHODS[cfg.name](cfg, family)


__all__ = ["METHODS", "Method", "build_method"]
