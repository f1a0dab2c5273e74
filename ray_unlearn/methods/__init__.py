"""Unlearning methods, picked by name from one explicit dict (adding one: its module, one line here,
its config class in config.py, its search space in search_spaces/, a README row)."""

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


def build_method(cfg, family) -> Method:
    return METHODS[cfg.name](cfg, family)


__all__ = ["METHODS", "Method", "build_method"]
