"""The base of every typed setting (config.py's sections and each method's own config class): an
unknown key or a wrong assignment is an error, never silently ignored. Kept apart from config.py so
that the methods, whose config classes config.py collects, never import config.py (no cycle)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
