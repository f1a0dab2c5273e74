"""What of a run may reach MLflow: forget targets are personal data (faces; their file names are
often a person's name). Only their content hashes leave our own storage.

`before_after.png`, `samples/` and target images are never logged (`is_private`; the tracker
refuses them), and the logged copy of report.json has target ids and paths replaced
(`redact_report`); the full report stays in our own object storage.
"""

from __future__ import annotations

import copy
from pathlib import Path

PRIVATE_FILES = ("before_after.png",)  # shows the target faces
PRIVATE_DIRS = ("samples",)  # the model's output for each target
REDACTED = "<redacted: personal data, see target_hashes>"


def is_private(path: Path) -> bool:
    """A picture that shows forget targets (never logged)."""
    path = Path(path)
    return path.name in PRIVATE_FILES or any(p in PRIVATE_DIRS for p in path.parts[:-1])


def redact_config(cfg: dict) -> dict:
    """A copy of a config dict without target or surrogate file paths (a face's file name is often
    a person's name). Seeds stay: they are not personal data."""
    cfg = copy.deepcopy(cfg)
    if isinstance(cfg.get("targets"), list):
        cfg["targets"] = [
            {k: (REDACTED if k in ("image", "noise") and v else v) for k, v in t.items()} if isinstance(t, dict) else REDACTED
            for t in cfg["targets"]
        ]
    sur = cfg.get("surrogate")
    if isinstance(sur, dict) and sur.get("paths"):
        sur["paths"] = [REDACTED] * len(sur["paths"])
    return cfg


def redact_report(report: dict) -> dict:
    """The report as MLflow may show it: target ids (file stems) replaced by content hashes, the
    config's target and surrogate paths removed."""
    report = copy.deepcopy(report)
    for i, row in enumerate(report.get("targets") or []):
        if isinstance(row, dict):
            h = row.get("content_sha256")
            row["id"] = f"target-{str(h)[:12]}" if h else f"target-{i}"
    if isinstance(report.get("config"), dict):
        report["config"] = redact_config(report["config"])
    return report
