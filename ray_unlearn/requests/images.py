"""The door check for submitted images: refuse what is unsafe or unreadable, normalise the rest.

Everything here runs on bytes in memory and writes nothing, so a refused request stores nothing.
Order matters: the byte size is checked before parsing, the pixel count before decoding (a
100000x100000 PNG header costs nothing until it is decoded), and only the accepted formats' parsers
are ever run (Pillow's EPS reader would start Ghostscript, for one).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ray_unlearn.requests.models import RequestError

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


def normalise_image(data: bytes, *, max_bytes: int, max_pixels: int, allowed_formats=DEFAULT_FORMATS) -> NormalisedImage:
    allowed = sorted({f.upper() for f in allowed_formats})
    accepted = f"send a {_names(allowed)} file"
    if not data:
        raise RequestError("the image is empty (0 bytes): " + accepted)
    if len(data) > max_bytes:
        raise RequestError(f"the image is {len(data):,} bytes; the limit is {max_bytes:,}: send a smaller file")
    parsers = sorted(set(allowed))  # (the JPEG parser also reads MPO, the multi-picture JPEG of phones)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=parsers) as im:
                fmt = "JPEG" if im.format == "MPO" else (im.format or "?")
                _check_header(im, fmt, allowed, max_pixels)
                im.verify()  # structure and checksums, without decoding (verify() spends the object)
            with Image.open(io.BytesIO(data), formats=parsers) as im:
                im.load()  # a truncated or corrupt pixel stream fails here
                im = ImageOps.exif_transpose(im)  # the picture as the requester sees it
                out = _to_rgb_or_l(im)
        except RequestError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise RequestError(f"the image has too many pixels ({err}); the limit is {max_pixels:,}: send it smaller") from None
        except Exception as err:  # hostile files reach odd corners of the parsers: refuse them all
            kind = next((name for magic, name in _MAGIC.items() if data[:len(magic)].lower() == magic.lower()), None)
            if kind and kind not in allowed:
                raise RequestError(f"{kind} images are not accepted: {accepted}") from None
            if isinstance(err, UnidentifiedImageError) and not kind:
                raise RequestError(f"not an image in an accepted format: {accepted}") from None
            detail = "it starts like one but cannot be parsed" if isinstance(err, UnidentifiedImageError) else f"{type(err).__name__}: {err}"
            raise RequestError(f"the {kind or 'image'} file is truncated or corrupt ({detail}): "
                               "send the original file again") from None
    buf = io.BytesIO()
    out.save(buf, format="PNG")  # lossless, and no EXIF/GPS metadata is carried over
    h = hashlib.sha256(f"{out.mode} {out.width}x{out.height}\n".encode())
    h.update(out.tobytes())
    return NormalisedImage(buf.getvalue(), h.hexdigest(), out.width, out.height, out.mode, fmt)


def _names(formats: list[str]) -> str:
    return ", ".join(formats[:-1]) + " or " + formats[-1] if len(formats) > 1 else formats[0]


def _check_header(im: Image.Image, fmt: str, allowed: list[str], max_pixels: int) -> None:
    if fmt not in allowed:
        raise RequestError(f"{fmt} images are not accepted: send a {_names(allowed)} file")
    w, h = im.size
    if w < 1 or h < 1:
        raise RequestError(f"the image is {w}x{h}: it has no pixels")
    if w * h > max_pixels:
        raise RequestError(f"the image is {w}x{h} = {w * h:,} pixels; the limit is {max_pixels:,}: send it smaller")
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
