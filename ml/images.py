"""Safe decoding of untrusted vendor images into uint8 arrays of one size and channel count."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # refuse larger declared sizes before decoding (decompression bombs)
ALLOWED_FORMATS = {"PNG", "JPEG"}
# An image smaller than this carries too little to judge its label, whatever image_size is; by default
# an image may be upscaled at most MAX_UPSCALE times to reach image_size.
MIN_SIDE_FLOOR = 8
MAX_UPSCALE = 4
DEFAULT_MAX_ASPECT_RATIO = 4.0
AUTO = "auto"


class ImageError(ValueError):
    """An image cannot be used; the message is the reason recorded in quarantine."""


@dataclass(frozen=True)
class ImageLimits:
    """What a delivered image must be to be scored: its shorter side at least ``min_side`` pixels, its
    longer side at most ``max_aspect_ratio`` times the shorter, and not blank (every pixel the same).

    A degenerate image gives the classifier no evidence, so its label cannot be judged: scored, a 1x1
    image came out as a vendor's most likely error. Such images are quarantined, never billed.
    """

    min_side: int = MIN_SIDE_FLOOR
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO

    def check_shape(self, height: int, width: int) -> None:
        """Raise ImageError when an image of ``height`` x ``width`` pixels is too small or too elongated."""
        short, long = sorted((height, width))
        if short < self.min_side:
            raise ImageError(f"image too small ({width}x{height} px; min_image_side {self.min_side} px)")
        if long > self.max_aspect_ratio * short:
            raise ImageError(f"extreme aspect ratio ({long / short:.3g}:1, {width}x{height} px; "
                             f"max_aspect_ratio {self.max_aspect_ratio:g})")


def image_limits(image_size: int | None, min_image_side: int | str = AUTO,
                 max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> ImageLimits:
    """The limits for a home whose images are stored at ``image_size`` (None while it is not known yet).

    ``min_image_side`` "auto" is a quarter of ``image_size`` (at most 4x upscaling), never under
    MIN_SIDE_FLOOR; while the size is unknown, MIN_SIDE_FLOOR.
    """
    if min_image_side == AUTO:
        min_image_side = max(MIN_SIDE_FLOOR, (image_size or 0) // MAX_UPSCALE)
    return ImageLimits(int(min_image_side), float(max_aspect_ratio))


def _check_not_blank(img: Image.Image) -> None:
    """Raise ImageError when every pixel has the same value in every channel.

    Exact equality, not a near-constant threshold: dark, faint or low-contrast images are real
    content the classifier can read, while a uniform image (PNG or JPEG alike decode exactly
    constant) has none.
    """
    extrema = img.getextrema()
    bands = extrema if isinstance(extrema[0], tuple) else (extrema,)
    if all(low == high for low, high in bands):
        value = ", ".join(str(low) for low, _ in bands)
        raise ImageError(f"image is blank: every pixel has the same value ({value})")


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
    except IsADirectoryError as exc:  # the vendor's row names a folder: bad input, like a missing file
        raise ImageError("a folder, not an image file") from exc
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"not a readable image: {exc.__class__.__name__}") from exc
    if img.format not in ALLOWED_FORMATS:
        img.close()
        raise ImageError(f"unsupported image format {img.format} (PNG or JPEG expected)")
    if img.width * img.height > MAX_PIXELS:
        img.close()
        raise ImageError(f"declared size {img.width}x{img.height} exceeds {MAX_PIXELS} pixels")
    return img


def decode_image(path: Path, size: int, channels: int, limits: ImageLimits | None = None) -> np.ndarray:
    """Decode ``path`` into a uint8 array of shape (size, size, channels): its shorter side scaled to
    ``size`` and the square at its centre kept (the aspect ratio is kept, as backbones were trained,
    not squashed).

    EXIF orientation is applied; 16-bit images are scaled to 8 bits; alpha is composed over black
    (the background of the reference datasets); palette and CMYK are converted. With ``limits``, an
    image too small or too elongated is refused from its header, before decoding, and a blank one
    (judged on the whole image in the stored channels, before scaling) after.
    """
    with _open(path) as img:
        if limits is not None:
            limits.check_shape(img.height, img.width)
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
            img = _to_8bit(img)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                img = Image.alpha_composite(background, rgba)
            img = img.convert("L" if channels == 1 else "RGB")
            if limits is not None:
                _check_not_blank(img)
            if img.size != (size, size):
                img = ImageOps.fit(img, (size, size), method=Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
        except ImageError:
            raise  # already a reason (a blank image), not a decoding failure
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"cannot decode image: {exc}") from exc
    return array.reshape(size, size, channels)


def _to_8bit(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8), "L")
    return img
