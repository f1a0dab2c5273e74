"""What a done request keeps instead of its picture, and how a later model is checked against it.

A request's evidence holds its SSCD descriptor (the 512-d copy-detection embedding of the picture,
float16, base64: about 1.4 kB, no pixels) and its seed. That is enough to re-verify it on any later
model without the image: generate that model's output for the seed, embed it, and compare with the
descriptor against the threshold recorded when the request was done. A request without a seed is
judged by what the model makes of the picture itself (SDEdit at 0.5 T), which needs the pixels:
once its image is purged it can no longer be re-verified (see docs/requests.md).
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ray_unlearn import evaluate as ev

DESCRIPTOR_DIM = 512


def encode_descriptor(embedding: torch.Tensor, source: str) -> dict:
    vec = embedding.detach().float().cpu().reshape(-1)
    if vec.numel() != DESCRIPTOR_DIM:
        raise ValueError(f"an SSCD descriptor has {DESCRIPTOR_DIM} values, got {vec.numel()}")
    raw = vec.numpy().astype("<f2").tobytes()
    return {"kind": "sscd", "source": source, "dtype": "float16", "dim": DESCRIPTOR_DIM,
            "sha256": hashlib.sha256(raw).hexdigest(), "b64": base64.b64encode(raw).decode()}


def decode_descriptor(d: dict) -> torch.Tensor:
    raw = base64.b64decode(d["b64"])
    if hashlib.sha256(raw).hexdigest() != d.get("sha256"):
        raise ValueError("the stored descriptor does not match its checksum")
    vec = torch.from_numpy(np.frombuffer(raw, dtype="<f2").astype(np.float32))
    return vec / vec.norm().clamp_min(1e-12)  # fp16 rounding: renormalise so a copy still scores ~1


@dataclass
class Check:
    """One done (or just-unlearned) request to check on a model."""

    id: str
    seed: int | None
    descriptor: torch.Tensor  # [512]
    threshold: float
    image: torch.Tensor | None = None  # prepared picture, only for a seedless request whose image is kept


def check_from_evidence(request_id: str, evidence: dict, image: torch.Tensor | None = None) -> Check | None:
    """None for a request processed without a descriptor (nothing to compare against)."""
    if not evidence.get("descriptor") or not evidence.get("threshold"):
        return None
    return Check(request_id, evidence.get("seed"), decode_descriptor(evidence["descriptor"]),
                 float(evidence["threshold"]["value"]), image)


def outputs_for(family, checks: list[Check]) -> tuple[torch.Tensor, list[Check]]:
    """The model's outputs for the checks it can judge (seed, or a kept picture), in that order."""
    seeded = [c for c in checks if c.seed is not None]
    pictured = [c for c in checks if c.seed is None and c.image is not None]
    outs = [family.generate(family.initial_noise([c.seed for c in seeded]))] if seeded else []
    outs += [family.sdedit(c.image[None], ev.EVAL_STRENGTH, seed=0) for c in pictured]
    return (torch.cat(outs) if outs else torch.empty(0)), seeded + pictured


def judge_checks(checks: list[Check], judged: list[Check], outputs: torch.Tensor, emb: torch.Tensor,
                 artifact_bound: float) -> list[dict]:
    """One row per check, from `outputs_for`'s outputs and their SSCD embeddings; a seedless
    check without its image is reported as not re-verifiable (forgotten None)."""
    rows: dict[str, dict] = {}
    hf = ev.high_frequency_energy(outputs) if len(judged) else []
    for i, c in enumerate(judged):
        sim = float((emb[i] * c.descriptor).sum())
        artifact = bool(hf[i] > artifact_bound)
        forgotten, why = ev.target_verdict(sim < c.threshold, artifact)
        rows[c.id] = {"id": c.id, "via": "seed" if c.seed is not None else "picture (SDEdit 0.5T)",
                      "sscd": round(sim, 4), "threshold": c.threshold, "artifact": artifact,
                      "forgotten": forgotten, "why": why}
    for c in checks:
        rows.setdefault(c.id, {"id": c.id, "via": None, "sscd": None, "threshold": c.threshold, "artifact": None,
                               "forgotten": None, "why": "no seed and the image is purged: not re-verifiable"})
    return [rows[c.id] for c in checks]


def verify(family, metrics, checks: list[Check], artifact_bound: float) -> list[dict]:
    """Is each request still forgotten by `family`'s current weights?"""
    return verify_with_outputs(family, metrics, checks, artifact_bound)[0]


def verify_with_outputs(family, metrics, checks: list[Check], artifact_bound: float
                        ) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """`verify`, and the outputs it judged by request id (a seeded one's is the model's output for
    its seed, which replay_as 'hold' holds: no second sampling)."""
    outputs, judged = outputs_for(family, checks)
    emb = metrics.sscd_embed(outputs) if judged else torch.empty(0, DESCRIPTOR_DIM)
    return judge_checks(checks, judged, outputs, emb, artifact_bound), {c.id: o for c, o in zip(judged, outputs)}


def regressions(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["forgotten"] is False]
