"""Safe decoding of untrusted vendor images into uint8 arrays of one size and channel count."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # refuse larger declared sizes before decoding (decompression bombs)
ALLOWED_FORMATS = {"PNG", "JPEG"}


class ImageError(ValueError):
    """An image cannot be used; the message is the reason recorded in quarantine."""


def probe_image(path: Path) -> tuple[int, int, int]:
    """Return ``(height, width, channels)`` of an image without decoding its pixels."""
    with _open(path) as img:
        channels = 1 if img.mode in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F") else 3
        return img.height, img.width, channels


def _open(path: Path) -> Image.Image:
    try:
        if Path(path).stat().st_size == 0:
            raise ImageError("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
    except FileNotFoundError as exc:
        raise ImageError("image file not found") from exc
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"not a readable image: {exc.__class__.__name__}") from exc
    if img.format not in ALLOWED_FORMATS:
        img.close()
        raise ImageError(f"unsupported image format {img.format} (PNG or JPEG expected)")
    if img.width * img.height > MAX_PIXELS:
        img.close()
        raise ImageError(f"declared size {img.width}x{img.height} exceeds {MAX_PIXELS} pixels")
    return img


def decode_image(path: Path, size: int, channels: int) -> np.ndarray:
    """Decode ``path`` into a uint8 array of shape (size, size, channels): its shorter side scaled to
    ``size`` and the square at its centre kept (the aspect ratio is kept, as backbones were trained,
    not squashed).

    EXIF orientation is applied; 16-bit images are scaled to 8 bits; alpha is composed over black
    (the background of the reference datasets); palette and CMYK are converted.
    """
    with _open(path) as img:
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_8bit(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                img = Image.alpha_composite(background, rgba)
            img = img.convert("L" if channels == 1 else "RGB")
            if img.size != (size, size):
                img = ImageOps.fit(img, (size, size), method=Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"cannot decode image: {exc}") from exc
    return array.reshape(size, size, channels)


def _to_8bit(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    return img
