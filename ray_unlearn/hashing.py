"""Content hashes: cache keys, evidence for deletion requests, per-sample seeds."""

from __future__ import annotations

import hashlib
import json

import torch


def content_hash(*parts: object) -> str:
    """sha256 (first 16 hex digits) of tensors' bytes and JSON-able values, in order."""
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True).encode())
    return h.hexdigest()[:16]
