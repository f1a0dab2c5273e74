"""National flags drawn by code: the training data of the shipped SD3 demo model, its `provided`
surrogates (the correct flag, drawn by the same code) and the classifier its model card uses to
call a generated flag right or wrong.

Every flag fills a square canvas (the demo model is square). Colours are approximate official
colours; the geometry is simplified (no emblems).
"""

from __future__ import annotations

import torch

# name -> (kind, colours, extra). kinds: 'v3' vertical tricolour, 'h3' horizontal tricolour,
# 'h2' horizontal bicolour, 'nordic' cross offset to the hoist, 'swiss' centred cross, 'disc'.
_RGB = {
    "white": (1.0, 1.0, 1.0),
    "red": (0.80, 0.07, 0.14),
    "green": (0.0, 0.55, 0.27),
    "orange": (1.0, 0.53, 0.24),
    "blue": (0.0, 0.22, 0.58),
    "black": (0.0, 0.0, 0.0),
    "gold": (1.0, 0.80, 0.0),
    "yellow": (1.0, 0.84, 0.0),
    "sky": (0.0, 0.36, 0.73),
    "dkgreen": (0.0, 0.42, 0.31),
}

FLAGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "Japan": ("disc", ("white", "red")),
    "Ireland": ("v3", ("green", "white", "orange")),
    "Italy": ("v3", ("green", "white", "red")),
    "France": ("v3", ("blue", "white", "red")),
    "Belgium": ("v3", ("black", "yellow", "red")),
    "Germany": ("h3", ("black", "red", "gold")),
    "Netherlands": ("h3", ("red", "white", "blue")),
    "Russia": ("h3", ("white", "blue", "red")),
    "Austria": ("h3", ("red", "white", "red")),
    "Ukraine": ("h2", ("sky", "yellow")),
    "Poland": ("h2", ("white", "red")),
    "Sweden": ("nordic", ("sky", "yellow")),
    "Denmark": ("nordic", ("red", "white")),
    "Finland": ("nordic", ("white", "blue")),
    "Switzerland": ("swiss", ("red", "white")),
    "Bangladesh": ("disc", ("dkgreen", "red")),
}

# Ireland's colours reversed (orange-white-green): the error the demo data may carry on purpose
# (what the flag of Cote d'Ivoire looks like). Not a training class of its own.
WRONG_IRELAND = ("v3", ("orange", "white", "green"))


def caption(name: str) -> str:
    return f"the flag of {name}"


def _rgb(name: str) -> torch.Tensor:
    return torch.tensor(_RGB[name]).view(3, 1, 1)


def draw(spec: tuple[str, tuple[str, ...]] | str, size: int = 32, jitter: torch.Generator | None = None) -> torch.Tensor:
    """One flag as a [3,size,size] float image in [0,1]. With a generator, mild jitter: a shift
    and scale of the design of a few percent, and a small per-colour brightness change."""
    if isinstance(spec, str):
        if spec not in FLAGS:
            raise KeyError(f"unknown flag '{spec}'; known: {', '.join(FLAGS)}")
        spec = FLAGS[spec]
    kind, names = spec
    cols = [_rgb(n) for n in names]
    dx = dy = 0.0
    scale = 1.0
    if jitter is not None:
        r = torch.rand(3, generator=jitter)
        dx, dy = (r[0].item() - 0.5) * 0.08, (r[1].item() - 0.5) * 0.08
        scale = 1.0 + (r[2].item() - 0.5) * 0.08
        cols = [(c * (1 + 0.08 * (torch.rand(1, generator=jitter).item() - 0.5))).clamp(0, 1) for c in cols]
    # pixel centres in [0,1], with the design shifted and scaled about the centre
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    v = ((lin - 0.5) / scale + 0.5 - dy).view(size, 1).expand(size, size)
    u = ((lin - 0.5) / scale + 0.5 - dx).view(1, size).expand(size, size)
    img = cols[0].expand(3, size, size).clone()

    def paint(mask: torch.Tensor, col: torch.Tensor) -> None:
        img[:] = torch.where(mask.unsqueeze(0), col.expand(3, size, size), img)

    if kind == "v3":
        paint(u >= 1 / 3, cols[1])
        paint(u >= 2 / 3, cols[2])
    elif kind == "h3":
        paint(v >= 1 / 3, cols[1])
        paint(v >= 2 / 3, cols[2])
    elif kind == "h2":
        paint(v >= 0.5, cols[1])
    elif kind == "nordic":
        paint(((u - 0.36).abs() < 0.09) | ((v - 0.5).abs() < 0.09), cols[1])
    elif kind == "swiss":
        arm = ((u - 0.5).abs() < 0.1) & ((v - 0.5).abs() < 0.3)
        paint(arm | (((v - 0.5).abs() < 0.1) & ((u - 0.5).abs() < 0.3)), cols[1])
    elif kind == "disc":
        cx = 0.45 if names[0] == "dkgreen" else 0.5  # Bangladesh's disc sits toward the hoist
        paint((u - cx) ** 2 + (v - 0.5) ** 2 < 0.3**2, cols[1])
    else:  # pragma: no cover - the table above is the only source of kinds
        raise ValueError(kind)
    return img.clamp(0, 1)


def templates(size: int = 32) -> dict[str, torch.Tensor]:
    """The un-jittered flags by name, plus the reversed Ireland, for nearest-template labelling."""
    out = {name: draw(name, size) for name in FLAGS}
    out["Ireland (reversed)"] = draw(WRONG_IRELAND, size)
    return out


def classify(images: torch.Tensor, size: int = 32) -> list[tuple[str, float]]:
    """Nearest template by mean squared error: (label, mse) per image ([N,3,H,W] in [0,1])."""
    import torch.nn.functional as F

    refs = templates(size)
    names = list(refs)
    stack = torch.stack([refs[n] for n in names])  # [K,3,s,s]
    if images.shape[-1] != size:
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    d = ((images.float().unsqueeze(1) - stack.unsqueeze(0)) ** 2).mean(dim=(2, 3, 4))  # [N,K]
    best = d.argmin(1)
    return [(names[int(i)], float(d[j, i])) for j, i in enumerate(best)]


def dataset(
    per_flag: int, size: int = 32, seed: int = 0, wrong_share: float = 0.0
) -> tuple[torch.Tensor, list[str], list[bool]]:
    """`per_flag` jittered images of every flag with their captions. A share `wrong_share` of
    Ireland's images is drawn with the colours reversed (captioned as Ireland all the same), the
    way a mislabelled scrape plants an error. Returns (images, captions, is_wrong)."""
    g = torch.Generator().manual_seed(seed)
    n_wrong = round(per_flag * wrong_share)
    imgs, caps, wrong = [], [], []
    for name in FLAGS:
        for i in range(per_flag):
            bad = name == "Ireland" and i < n_wrong
            imgs.append(draw(WRONG_IRELAND if bad else name, size, jitter=g))
            caps.append(caption(name))
            wrong.append(bad)
    return torch.stack(imgs), caps, wrong
