"""The door check for submitted images: refuse what is unsafe or unreadable, normalise the rest.

Everything here runs on bytes in memory and writes nothing, so a refused request stores nothing.
Order matters: the byte size is checked before parsing, the pixel count before decoding (a
100000x100000 PNG header costs nothing until it is decoded; the limit is ray_unlearn.data.MAX_PIXELS,
the one of every decoder), and only the accepted formats' parsers are ever run (Pillow's EPS reader
would start Ghostscript, for one). A picture larger than the model needs is downscaled here, at the
door, so that no batch ever decodes a 6000x6000 image for a 32 px model.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from ray_unlearn.data import MAX_PIXELS, ImageError, decode_image, open_image
from ray_unlearn.requests.models import RequestError

__all__ = ["DEFAULT_FORMATS", "MAX_PIXELS", "NormalisedImage", "normalise_image"]

DEFAULT_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "BMP", "TIFF"})
_MAGIC = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
          b"RIFF": "WEBP", b"GIF8": "GIF", b"%PDF": "PDF", b"%!PS": "PostScript", b"<svg": "SVG",
          b"<?xm": "SVG/XML", b"\x00\x00\x01\x00": "ICO", b"8BPS": "PSD"}
_GREY_WIDE = ("I", "F")  # 32-bit int / float grey: scaled, not clipped, to 8 bits
_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")


@dataclass(frozen=True)
class NormalisedImage:
    png: bytes  # what is stored: RGB or L, no metadata
    sha256: str  # of mode, size and pixels, so a re-encode of the same picture is the same request
    width: int
    height: int
    mode: str
    source_format: str
    original_sha256: str | None = None  # the picture before the door's downscale (None: not downscaled)
    original_size: tuple[int, int] | None = None


def normalise_image(data: bytes, *, max_bytes: int, allowed_formats=DEFAULT_FORMATS,
                    max_side: int | None = None) -> NormalisedImage:
    """Check and normalise a submitted picture (the pixel limit is `ray_unlearn.data.MAX_PIXELS`,
    the one every decoder uses). `max_side`: a picture larger than that on either side is
    downscaled to fit (aspect kept), and the hash of the original is recorded too."""
    allowed = sorted({f.upper() for f in allowed_formats})
    accepted = f"send a {_names(allowed)} file"
    if not data:
        raise RequestError("the image is empty (0 bytes): " + accepted)
    if len(data) > max_bytes:
        raise RequestError(f"the image is {len(data):,} bytes; the limit is {max_bytes:,}: send a smaller file")
    parsers = sorted(set(allowed))  # (the JPEG parser also reads MPO, the multi-picture JPEG of phones)
    try:
        with open_image(data, formats=parsers) as im:
            fmt = "JPEG" if im.format == "MPO" else (im.format or "?")
            _check_header(im, fmt, allowed)
            im.verify()  # structure and checksums, without decoding (verify() spends the object)
        out = _to_rgb_or_l(decode_image(data, formats=parsers))
    except ImageError as err:  # the pixel limit
        raise RequestError(str(err)) from None
    except RequestError:
        raise
    except Exception as err:  # hostile files reach odd corners of the parsers: refuse them all
        kind = next((name for magic, name in _MAGIC.items() if data[:len(magic)].lower() == magic.lower()), None)
        if kind and kind not in allowed:
            raise RequestError(f"{kind} images are not accepted: {accepted}") from None
        if isinstance(err, UnidentifiedImageError) and not kind:
            raise RequestError(f"not an image in an accepted format: {accepted}") from None
        detail = "it starts like one but cannot be parsed" if isinstance(err, UnidentifiedImageError) else f"{type(err).__name__}: {err}"
        raise RequestError(f"the {kind or 'image'} file is truncated or corrupt ({detail}): "
                           "send the original file again") from None
    original_sha, original_size = None, None
    if max_side is not None and max(out.size) > max_side:
        original_sha, original_size = _pixel_hash(out), out.size
        out = out.copy()
        out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)  # aspect kept; antialiased
    buf = io.BytesIO()
    out.save(buf, format="PNG")  # lossless, and no EXIF/GPS metadata is carried over
    return NormalisedImage(buf.getvalue(), _pixel_hash(out), out.width, out.height, out.mode, fmt,
                           original_sha, original_size)


def _pixel_hash(im: Image.Image) -> str:
    h = hashlib.sha256(f"{im.mode} {im.width}x{im.height}\n".encode())
    h.update(im.tobytes())
    return h.hexdigest()


def _names(formats: list[str]) -> str:
    return ", ".join(formats[:-1]) + " or " + formats[-1] if len(formats) > 1 else formats[0]


def _check_header(im: Image.Image, fmt: str, allowed: list[str]) -> None:
    if fmt not in allowed:
        raise RequestError(f"{fmt} images are not accepted: send a {_names(allowed)} file")
    w, h = im.size
    if w < 1 or h < 1:
        raise RequestError(f"the image is {w}x{h}: it has no pixels")
    frames = getattr(im, "n_frames", 1)
    if frames > 1 and im.format != "MPO":  # MPO: the first frame is the photo, the rest are previews
        raise RequestError(f"the image has {frames} frames (animation or multi-page): send the single frame to remove")


def _to_rgb_or_l(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "P":
        mode = "PA" if "transparency" in im.info else "RGB"
        im = im.convert("RGBA" if mode == "PA" else "RGB")
    if mode in ("1", "L"):
        return im.convert("L")
    if mode.startswith("I;16") or mode in _GREY_WIDE:
        # Pillow's convert("L") clips 16-bit values at 255; scale the range instead
        arr = np.asarray(im, dtype=np.float64)
        if mode == "F":
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        elif mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if mode in _ALPHA or im.mode in _ALPHA:
        # flattened onto white, as most viewers show transparency; what is hidden under alpha=0 is
        # not part of the picture the requester saw
        grey = mode in ("LA", "La")
        rgba = im.convert("RGBA")
        flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return flat.convert("L") if grey else flat
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX ...
