"""Images in and out, targets, and the remember set (base-model samples cached on disk)."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ray_unlearn.config import RememberConfig, TargetSpec
from ray_unlearn.hashing import content_hash
from ray_unlearn.families.base import DiffusionFamily

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# The one pixel limit of every decoded image (target files, submitted requests, a batch's
# pictures), checked from the header before any pixel is decoded (a decompression bomb costs nothing).
# Below Pillow's own bomb limit (89.5 M), so Pillow's never speaks first.
MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    pass


@contextlib.contextmanager
def open_image(data: bytes, *, formats: list[str] | None = None, what: str = "the image") -> Iterator[Image.Image]:
    """An opened, not yet decoded, image whose pixel count is within MAX_PIXELS (only the given
    formats' parsers run). Pillow's own errors pass through for the caller to word."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS is checked below instead
        try:
            im = Image.open(io.BytesIO(data), formats=formats)
        except Image.DecompressionBombError:
            raise ImageError(f"{what} has far more pixels than the limit of {MAX_PIXELS:,}: send it smaller") from None
    with im:
        if im.width * im.height > MAX_PIXELS:
            raise ImageError(f"{what} is {im.width}x{im.height} = {im.width * im.height:,} pixels; the limit is "
                             f"{MAX_PIXELS:,}: send it smaller")
        yield im


def decode_image(data: bytes, *, formats: list[str] | None = None, what: str = "the image") -> Image.Image:
    """The one decoder: pixel limit from the header, then decode, then the EXIF orientation applied
    (the picture as its owner sees it)."""
    with open_image(data, formats=formats, what=what) as im:
        im.load()  # a truncated or corrupt pixel stream fails here
        return ImageOps.exif_transpose(im)


def load_image(path: str | Path) -> torch.Tensor:
    """A float CHW tensor in [0,1] (RGB, or one channel for grey files); clear errors otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"{path} is a directory: give the image file inside it")
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    if path.stat().st_size == 0:
        raise ImageError(f"{path} is empty")
    try:
        im = decode_image(path.read_bytes(), what=str(path))
        grey = im.mode in ("L", "I", "I;16", "F", "1", "LA")
        arr = np.asarray(im.convert("L" if grey else "RGB"), dtype=np.float32) / 255.0
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as err:
        raise ImageError(f"{path} is not a readable image ({err.__class__.__name__}: {err})") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)


def save_image(img: torch.Tensor, path: str | Path) -> None:
    arr = (img.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    arr = arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)
    Image.fromarray(arr).save(path)


def load_folder(folder: str | Path, limit: int | None = None) -> list[torch.Tensor]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"remember folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ImageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return [load_image(p) for p in files[:limit]]


def load_noise(path: str | Path) -> torch.Tensor:
    path = Path(path)
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path)).float()
    return torch.load(path, map_location="cpu", weights_only=True).float()


def atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    torch.save(obj, tmp)
    os.replace(tmp, path)  # readers never see a half-written cache entry


class SampleCache:
    """Base-model outputs for given seeds, keyed by (weights hash, seeds, sampler settings)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser() / "samples"

    def key(self, family: DiffusionFamily, seeds: list[int]) -> str:
        return content_hash(family.fingerprint(), list(map(int, seeds)), family.sampler.model_dump(exclude={"batch_size"}))

    def _path(self, family: DiffusionFamily, seeds: list[int]) -> Path:
        return self.root / f"{family.fingerprint()}-{self.key(family, seeds)}.pt"

    def get(self, family: DiffusionFamily, seeds: list[int]) -> torch.Tensor | None:
        path = self._path(family, seeds)
        if path.is_file():
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                path.unlink(missing_ok=True)  # a corrupt entry is regenerated, not trusted
        return None

    def put(self, family: DiffusionFamily, seeds: list[int], images: torch.Tensor) -> None:
        atomic_torch_save(images, self._path(family, seeds))

    def get_or_generate(self, family: DiffusionFamily, seeds: list[int], desc: str) -> tuple[torch.Tensor, bool]:
        images = self.get(family, seeds)
        if images is not None:
            return images, True
        images = family.generate(family.initial_noise(seeds), progress=desc)
        self.put(family, seeds, images)
        return images, False


@dataclass
class Target:
    id: str
    image: torch.Tensor  # the output to forget, prepared for the model, [C,H,W] in [0,1]
    noise: torch.Tensor | None  # its initial noise when known (seed / noise file)
    spec: TargetSpec
    # where training puts its sampling path when `noise` is unknown: the image's inversion
    # (engine.path_starts); never used to judge it (the verdict SDEdits an image without noise)
    inverted: torch.Tensor | None = None

    @property
    def path_start(self) -> torch.Tensor | None:
        return self.noise if self.noise is not None else self.inverted

    @property
    def content_hash(self) -> str:
        return content_hash(self.image.float().cpu())


def resolve_targets(family: DiffusionFamily, specs: list[TargetSpec], generate: bool = True) -> list[Target]:
    """Targets given as files are read; targets given as a seed are the base model's output
    (`generate=False` leaves those images None, for a caller that samples them in a larger pass)."""
    if not specs:
        raise ValueError("no targets: give --target IMAGE and/or --target-seed N")
    targets, need = [], []
    for spec in specs:
        noise = None
        if spec.seed is not None:
            noise = family.initial_noise([spec.seed])[0]
        elif spec.noise is not None:
            noise = load_noise(spec.noise).reshape(family.initial_noise([0])[0].shape)
        image = family.prepare_images(load_image(spec.image)[None])[0].cpu() if spec.image else None
        targets.append(Target(spec.id, image, noise, spec))
        if image is None:
            need.append(len(targets) - 1)
    if need and generate:
        outs = family.generate(torch.stack([targets[i].noise for i in need]), progress="base outputs of targets")
        for i, img in zip(need, outs):
            targets[i].image = img
    ids = [t.id for t in targets]
    for i, t in enumerate(targets):  # keep ids unique: they name files and report rows
        if ids.count(t.id) > 1:
            t.id = f"{t.id}-{i}"
    return targets


def remember_images(family: DiffusionFamily, cfg: RememberConfig, cache: SampleCache) -> tuple[torch.Tensor, bool]:
    """The remember set and whether it came from the cache (a folder counts as cached)."""
    if cfg.source == "folder":
        if not cfg.folder:
            raise ValueError("remember.source='folder' needs remember.folder")
        return torch.cat([family.prepare_images(x[None]).cpu() for x in load_folder(cfg.folder)]), True
    seeds = list(range(cfg.seed_offset, cfg.seed_offset + cfg.n))
    return cache.get_or_generate(family, seeds, "remember set (base samples)")
