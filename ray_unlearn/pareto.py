"""Pareto front and hypervolume for forgetting vs. integrity (pure: no Ray, no MLflow).

A point is a trial's outcome: `sscd` (copy-detection score of the target against what the model
now makes of it: lower is more forgotten) and `integrity` (mean SSIM between base and unlearned
outputs on unrelated seeds: higher is better). Only trials that forgot their targets (SSCD below
the threshold, no artifact texture) can be on the front: a hotfix that keeps the face is no
hotfix, however intact the rest of the model is.
"""

from __future__ import annotations

from collections.abc import Sequence


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """(sscd, integrity): a is no worse on both (lower sscd, higher integrity) and better on one."""
    return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])


def eligible(point: dict, x: str = "sscd") -> bool:
    return bool(point.get("forgotten")) and point.get(x) is not None and point.get("integrity") is not None


def front(points: Sequence[dict], x: str = "sscd") -> list[dict]:
    """The non-dominated eligible points, sorted by `x` (most forgotten first). Exact duplicates
    of a front point are kept once (the first). `x`: the forgetting figure (lower is better):
    'sscd', or a search's relative objective ('forget', platform/search.py)."""
    cands = [p for p in points if eligible(p, x)]
    out, seen = [], set()
    for p in cands:
        xy = (float(p[x]), float(p["integrity"]))
        if xy in seen:
            continue
        if not any(dominates((float(q[x]), float(q["integrity"])), xy) for q in cands):
            out.append(p)
            seen.add(xy)
    return sorted(out, key=lambda p: (p[x], -p["integrity"]))


def hypervolume(points: Sequence[dict], ref_sscd: float, ref_integrity: float = 0.0, x: str = "sscd") -> float:
    """Area dominated by the front inside the box sscd in [0, ref_sscd], integrity in
    [ref_integrity, 1]: the larger, the better the trade-offs found. The natural reference is
    the forget threshold (a point at or above it did not forget) and integrity 0."""
    pts = sorted(
        ((float(p[x]), float(p["integrity"])) for p in front(points, x)
         if float(p[x]) < ref_sscd and float(p["integrity"]) > ref_integrity),
        key=lambda xy: xy[0],
    )
    area, best = 0.0, ref_integrity
    # strip [x_i, x_i+1): dominated up to the best integrity among points with sscd <= x_i
    for i, (x, y) in enumerate(pts):
        right = pts[i + 1][0] if i + 1 < len(pts) else ref_sscd
        best = max(best, y)
        area += (right - x) * (best - ref_integrity)
    return area


def choose(front_points: Sequence[dict], min_integrity: float, x: str = "sscd") -> dict | None:
    """The point to ship by default: the most intact one among those within the integrity bound
    (ties: the more forgotten). None when no point clears the bound."""
    ok = [p for p in front_points if float(p["integrity"]) >= min_integrity and p.get("passed", True)]
    return max(ok, key=lambda p: (p["integrity"], -p[x])) if ok else None
