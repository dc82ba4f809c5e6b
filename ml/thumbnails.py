"""Small PNG thumbnails of curated images, for reports a person reads."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

THUMB_SIDE = 96  # pixels: a 28x28 image becomes 112x112, a 24x24 digit 96x96


def upscale(image: np.ndarray, min_side: int = THUMB_SIDE) -> np.ndarray:
    """``image`` uint8 (H, W), (H, W, 1) or (H, W, 3), repeated by the smallest whole factor that makes
    its longer side at least ``min_side`` (nearest neighbour: every original pixel stays a crisp block).
    Returns uint8 (H*f, W*f) for grayscale, (H*f, W*f, 3) for RGB."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"thumbnail: expected a uint8 image, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"thumbnail: expected (H, W), (H, W, 1) or (H, W, 3), got shape {array.shape}")
    if min(array.shape[:2]) == 0:
        raise ValueError(f"thumbnail: empty image of shape {array.shape}")
    factor = max(1, math.ceil(min_side / max(array.shape[:2])))
    return array.repeat(factor, axis=0).repeat(factor, axis=1)


def png_bytes(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) grayscale or (H, W, 3) RGB array, as is."""
    buffer = io.BytesIO()
    Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def thumbnail_png(image: np.ndarray, min_side: int = THUMB_SIDE) -> bytes:
    """PNG bytes of one uint8 image (H, W[, C]) with C 1 or 3, upscaled to a readable size (``upscale``)."""
    return png_bytes(upscale(image, min_side))


def contact_sheet(images: list[np.ndarray], columns: int = 6, min_side: int = THUMB_SIDE, gap: int = 4) -> bytes:
    """PNG bytes of several uint8 images (H, W[, C]) of one size on a grid ``columns`` wide, each upscaled
    as by ``thumbnail_png``, separated by ``gap`` white pixels."""
    if not images:
        raise ValueError("contact sheet: no images")
    tiles = [upscale(image, min_side) for image in images]
    rgb = any(t.ndim == 3 for t in tiles)
    tiles = [np.repeat(t[:, :, None], 3, axis=2) if rgb and t.ndim == 2 else t for t in tiles]
    height, width = tiles[0].shape[:2]
    if any(t.shape[:2] != (height, width) for t in tiles):
        raise ValueError("contact sheet: images differ in size")
    n_rows = math.ceil(len(tiles) / columns)
    n_cols = min(columns, len(tiles))
    shape = (n_rows * height + (n_rows - 1) * gap, n_cols * width + (n_cols - 1) * gap) + ((3,) if rgb else ())
    sheet = np.full(shape, 255, np.uint8)
    for i, tile in enumerate(tiles):
        top, left = (i // columns) * (height + gap), (i % columns) * (width + gap)
        sheet[top:top + height, left:left + width] = tile
    return png_bytes(sheet)
