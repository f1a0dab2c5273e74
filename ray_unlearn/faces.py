"""Portraits drawn by code: the training data of the shipped face demo model.

Every portrait is an identity made of ~25 continuous and discrete traits (head shape, skin tone,
hair style and colour, eye spacing, size and colour, brows, nose, mouth, glasses, beard, shirt,
background), drawn with anti-aliased shapes. The trait space is large enough that a model trained
on fresh draws every step cannot memorise a finite set of faces: its map from initial noise to
portrait is smooth, and two different identities differ in colour and layout, not only in fine
detail, so SSCD can tell "the same face, slightly changed" from "another person" at 32 px.

`portraits(n, size, generator)` returns [n,3,size,size] in [0,1]; all drawing is batched tensor
code (no per-pixel Python), about 3 ms per 32-px portrait on one CPU core (64 in 0.22 s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SKIN = torch.tensor([[0.98, 0.87, 0.77], [0.94, 0.76, 0.62], [0.82, 0.60, 0.45], [0.62, 0.42, 0.30], [0.42, 0.27, 0.18]])
HAIR = torch.tensor([[0.08, 0.06, 0.05], [0.35, 0.20, 0.10], [0.85, 0.70, 0.35], [0.70, 0.25, 0.10],
                     [0.75, 0.75, 0.75], [0.20, 0.20, 0.55], [0.55, 0.15, 0.45]])
IRIS = torch.tensor([[0.15, 0.35, 0.75], [0.35, 0.20, 0.08], [0.15, 0.50, 0.25], [0.05, 0.05, 0.05]])


def _lerp_palette(pal: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Continuous colour along a palette: u in [0,1] -> [n,3]."""
    x = u.clamp(0, 1) * (len(pal) - 1)
    i = x.floor().long().clamp(max=len(pal) - 2)
    w = (x - i).unsqueeze(1)
    return pal[i] * (1 - w) + pal[i + 1] * w


def _traits(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    return {
        "bg": 0.25 + 0.7 * r(n, 3),
        "head_cx": 0.5 + 0.06 * (r(n) - 0.5),
        "head_cy": 0.53 + 0.06 * (r(n) - 0.5),
        "head_rx": 0.22 + 0.08 * r(n),
        "head_ry": 0.28 + 0.08 * r(n),
        "skin": _lerp_palette(SKIN, r(n)),
        "hair_col": HAIR[torch.randint(0, len(HAIR), (n,), generator=g)] * (0.85 + 0.3 * r(n, 1)),
        "hair_style": torch.randint(0, 5, (n,), generator=g),  # bald, short, long, bangs, bun
        "hair_line": 0.10 + 0.10 * r(n),
        "eye_dx": 0.08 + 0.06 * r(n),
        "eye_dy": -0.02 + 0.08 * (r(n) - 0.5),
        "eye_r": 0.030 + 0.025 * r(n),
        "iris": IRIS[torch.randint(0, len(IRIS), (n,), generator=g)],
        "brow_tilt": 0.08 * (r(n) - 0.5),
        "brow_w": 0.012 + 0.02 * r(n),
        "nose_len": 0.04 + 0.07 * r(n),
        "mouth_w": 0.06 + 0.09 * r(n),
        "mouth_y": 0.15 + 0.07 * r(n),
        "mouth_curve": 0.10 * (r(n) - 0.4),
        "mouth_col": torch.stack([0.55 + 0.4 * r(n), 0.1 + 0.2 * r(n), 0.15 + 0.2 * r(n)], 1),
        "glasses": (r(n) < 0.25),
        "glasses_col": 0.6 * r(n, 3),
        "beard": (r(n) < 0.2),
        "shirt": 0.1 + 0.85 * r(n, 3),
        "shirt_w": 0.30 + 0.15 * r(n),
        "tilt": 0.16 * (r(n) - 0.5),
    }


def portraits(n: int, size: int = 32, generator: torch.Generator | None = None, supersample: int = 4) -> torch.Tensor:
    """`n` random portraits as [n,3,size,size] in [0,1] (drawn at `supersample` x size, then averaged)."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    t = _traits(n, g)
    s = size * supersample
    lin = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    Y = lin.view(1, s, 1).expand(n, s, s)
    X = lin.view(1, 1, s).expand(n, s, s)
    v = lambda k: t[k].view(n, 1, 1)  # noqa: E731

    # head frame: centred on the head, rotated by a small tilt
    c, sn = torch.cos(v("tilt")), torch.sin(v("tilt"))
    dx, dy = X - v("head_cx"), Y - v("head_cy")
    hx, hy = c * dx + sn * dy, -sn * dx + c * dy
    img = t["bg"].view(n, 3, 1, 1).expand(n, 3, s, s).clone()

    def paint(mask: torch.Tensor, col: torch.Tensor) -> None:
        img[:] = torch.where(mask.unsqueeze(1), col.view(n, 3, 1, 1).expand(n, 3, s, s), img)

    # shoulders and shirt
    paint(((X - v("head_cx")) / v("shirt_w")) ** 2 + ((Y - 1.08) / 0.28) ** 2 < 1, t["shirt"])
    # neck
    paint(((X - v("head_cx")).abs() < 0.07) & (Y > v("head_cy")) & (Y < v("head_cy") + v("head_ry") + 0.1), t["skin"] * 0.9)
    head = (hx / v("head_rx")) ** 2 + (hy / v("head_ry")) ** 2 < 1
    style = t["hair_style"].view(n, 1, 1)
    hair_out = (hx / (v("head_rx") + 0.04)) ** 2 + ((hy + 0.02) / (v("head_ry") + 0.05)) ** 2 < 1
    long_hair = (style == 2) & (((hx.abs() < v("head_rx") + 0.05) & (hy > -0.05) & (hy < v("head_ry") + 0.08)) | hair_out)
    paint(long_hair, t["hair_col"])  # long hair falls behind the head
    bun = (style == 4) & ((hx**2 + (hy + v("head_ry") + 0.03) ** 2) < 0.07**2)
    paint(bun, t["hair_col"])
    # ears
    ear = ((hx.abs() - v("head_rx")) ** 2 / 0.03**2 + (hy + 0.01) ** 2 / 0.05**2) < 1
    paint(ear & (style != 2), t["skin"] * 0.92)
    paint(head, t["skin"])
    # hair on top: everything of the (slightly larger) hair ellipse above the hair line
    top = hair_out & (hy < -v("head_ry") + v("hair_line") + 0.04)
    bangs = hair_out & (hy < -v("head_ry") + v("hair_line") + 0.12) & ((style == 3) | (style == 2))
    paint((top & (style != 0)) | bangs, t["hair_col"])
    # beard: lower part of the face
    paint(t["beard"].view(n, 1, 1) & head & (hy > 0.08) & ((hx / v("head_rx")) ** 2 + ((hy - 0.02) / v("head_ry")) ** 2 > 0.35),
          t["hair_col"])
    # eyes: white, iris, then brows
    ey = hy - v("eye_dy")
    for side in (-1.0, 1.0):
        ex = hx - side * v("eye_dx")
        white = (ex / (v("eye_r") * 1.5)) ** 2 + (ey / v("eye_r")) ** 2 < 1
        paint(white, torch.ones(n, 3))
        paint(ex**2 + ey**2 < (0.75 * v("eye_r")) ** 2, t["iris"])
        brow_y = ey + 0.055 + side * v("brow_tilt") * ex / 0.05 * 0.3
        paint((ex.abs() < v("eye_r") * 1.6) & (brow_y.abs() < v("brow_w")), t["hair_col"] * 0.8)
        ring = (ex**2 + ey**2).sqrt()
        paint(t["glasses"].view(n, 1, 1) & ((ring - 0.06).abs() < 0.012), t["glasses_col"])
    paint(t["glasses"].view(n, 1, 1) & (hx.abs() < v("eye_dx") - 0.05) & ((ey + 0.005).abs() < 0.008), t["glasses_col"])
    # nose: a short darker stroke
    paint((hx.abs() < 0.016) & (hy > 0.0) & (hy < v("nose_len")), t["skin"] * 0.8)
    # mouth: a curved band
    my = hy - v("mouth_y") - v("mouth_curve") * (1 - (hx / v("mouth_w")) ** 2)
    paint((hx.abs() < v("mouth_w")) & (my.abs() < 0.018), t["mouth_col"])
    return F.avg_pool2d(img, supersample).clamp(0, 1)
