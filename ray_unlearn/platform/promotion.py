"""The promotion policy: a hotfix serves only when its evaluation shows it forgot every target and
kept the other outputs. The evaluation travels as registry tags (all strings), written at
registration from the engine's report (`version_tags`) and read back by `Version.refusal`.
No MLflow here: the policy is plain data, tested on tags written by hand.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

DEFAULT_MODEL_NAME = "ray-unlearn-hotfix"
SERVING_ALIAS = "production"


class PromotionRefused(RuntimeError):
    """Promotion was refused; the message says why, for the operator."""


def as_float(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    return float(x)


def _s(x) -> str:
    return "true" if x is True else "false" if x is False else str(x)


def version_tags(report: dict, **extra) -> dict[str, str]:
    """The evaluation of a hotfix as registry tags (all strings), from an engine report
    (`engine.write_outputs`). A figure the report lacks is omitted; nothing here raises on a
    partial report. `extra` is added as str() (None values are skipped)."""
    rows = [r for r in (report.get("targets") or []) if isinstance(r, dict)]
    th = report.get("forget_threshold") or {}
    integ = report.get("integrity") or {}
    spec = report.get("specificity") or {}
    sscd = [v for v in (as_float(r.get("sscd_unlearned")) for r in rows) if v is not None]
    base = [v for v in (as_float(r.get("sscd_base")) for r in rows) if v is not None]
    tags = {
        "passed": _s(report.get("passed") is True),
        "forgotten": _s(report.get("all_forgotten") is True),
        "artifact": _s(any(r.get("artifact") is True for r in rows)) if rows else None,
        "sscd": max(sscd) if sscd else None,
        "sscd_base": max(base) if base else None,
        "threshold": as_float(th.get("value")),
        "threshold_kind": th.get("kind"),
        "integrity_ssim": as_float(integ.get("ssim")),
        "min_integrity_ssim": as_float(integ.get("min_ssim")),
        # specificity (evaluate.target_verdict / integrity_gate): the least specific target's margin
        # and rank among the unrelated outputs, and the share of those pushed below the threshold
        "specific": _s(all(r.get("specific") is True for r in rows))
        if rows and all(r.get("specific") is not None for r in rows) else None,
        "specificity_margin": as_float(spec.get("target_margin")),
        "target_rank": as_float(spec.get("target_rank")),
        "unrelated_sscd_median": as_float(spec.get("median")),
        "unrelated_sscd_p10": as_float(spec.get("p10")),
        "collateral": as_float(spec.get("collateral")),
        "max_collateral": as_float(spec.get("max_collateral")),
        "fid": as_float(integ.get("fid")),
        "lpips": as_float(integ.get("lpips")),
        "method": report.get("method"),
        "target_hashes": ",".join(str(r["content_sha256"]) for r in rows if r.get("content_sha256")) or None,
        **extra,
    }
    return {k: _s(v) for k, v in tags.items() if v is not None}


def _f(x: float, other: float | None = None) -> str:
    """Two decimals, or four where two would print both sides of a comparison alike."""
    if other is not None and f"{x:.2f}" == f"{other:.2f}":
        return f"{x:.4f}"
    return f"{x:.2f}"


def _tag_float(tags: dict[str, str], key: str) -> float | None:
    try:
        return float(tags[key])
    except (KeyError, ValueError):
        return None


@dataclass
class Version:
    name: str
    version: int
    source: str
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.tags.get("passed") == "true"

    def refusal(self) -> str | None:
        """Why this version must not serve, phrased for the operator; None when it may."""
        t, v = self.tags, f"version {self.version}"
        if "forgotten" not in t or "passed" not in t:
            return f"{v} has no evaluation tags (was it registered by ray-unlearn?)"
        sscd, th = _tag_float(t, "sscd"), _tag_float(t, "threshold")
        n = len([h for h in t.get("target_hashes", "").split(",") if h])
        what = f"all {n} of its targets" if n > 1 else "its target"
        highest = "the highest SSCD" if n > 1 else "SSCD"
        kind = f" ({t['threshold_kind']})" if t.get("threshold_kind") else ""
        if t["forgotten"] != "true" or t.get("artifact") == "true":
            if sscd is None or th is None:
                return f"{v} did not forget {what}: SSCD was not measured (see its run's report.json)"
            if sscd >= th:
                return f"{v} did not forget {what}: {highest} {_f(sscd, th)} is not below the threshold {_f(th, sscd)}{kind}"
            if t.get("artifact") == "true":
                return (f"{v} did not forget {what}: {highest} {_f(sscd, th)} is below the threshold {_f(th, sscd)}{kind}, "
                        "but the output is artifact texture (high-frequency energy beyond the base model's)")
            if t.get("specific") == "false":
                margin = _tag_float(t, "specificity_margin")
                return (f"{v} did not forget {what} specifically: its output moved no more than unrelated outputs did"
                        + ("" if margin is None else f" (margin {margin:+.3f} to their low percentile)"))
            return f"{v} did not forget {what} (its report says a target was not forgotten)"
        ssim, bound = _tag_float(t, "integrity_ssim"), _tag_float(t, "min_integrity_ssim")
        if ssim is None:
            return f"{v} has no integrity SSIM (the metric was unavailable): nothing shows it kept other outputs"
        if bound is None:
            return f"{v} has no integrity bound (min_integrity_ssim) in its tags"
        if ssim < bound:
            return f"{v} fell below the integrity bound: SSIM {_f(ssim, bound)} < {_f(bound, ssim)}"
        collateral, max_collateral = _tag_float(t, "collateral"), _tag_float(t, "max_collateral")
        if collateral is not None and max_collateral is not None and collateral > max_collateral:
            return (f"{v} forgot other outputs too: collateral forgetting {collateral:.1%} of unrelated outputs "
                    f"below the threshold, above the bound {max_collateral:.1%}")
        if t["passed"] != "true":
            return f"{v} did not pass its evaluation (passed={t['passed']})"
        return None

    def summary(self) -> str:
        """'SSCD 0.53 < 0.63, integrity SSIM 0.80' from whichever figures the tags hold."""
        t, parts = self.tags, []
        sscd, th, ssim = _tag_float(t, "sscd"), _tag_float(t, "threshold"), _tag_float(t, "integrity_ssim")
        if sscd is not None:
            rel = "" if th is None else f" {'<' if sscd < th else '>='} {_f(th, sscd)}"
            parts.append(f"SSCD {_f(sscd, th)}{rel}")
        if ssim is not None:
            parts.append(f"integrity SSIM {ssim:.2f}")
        if _tag_float(t, "collateral") is not None:
            parts.append(f"collateral forgetting {_tag_float(t, 'collateral'):.0%}")
        return ", ".join(parts) or "no evaluation figures"
