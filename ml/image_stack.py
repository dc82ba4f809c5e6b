"""Many per-delivery uint8 image arrays read as one, memory-mapped: pixels are read from disk only
for the rows asked for, so a collection of photos never has to fit in memory at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def read_rows(images, rows: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, C) of ``images`` (N, H, W[, C]; an array or an ImageStack) at ``rows``, read now
    into one contiguous array (grayscale without a channel axis gets one)."""
    pixels = np.ascontiguousarray(images[rows])
    return pixels[..., None] if pixels.ndim == 3 else pixels


class ImageStack:
    """uint8 images (N, H, W, C) stored as several ``.npy`` files of the same image shape, in order.

    Indexing with an int, a slice, or an integer or boolean array returns a numpy array read from
    the files; ``np.asarray(stack)`` reads everything (for the small grayscale images trained from
    scratch). Iteration yields one image at a time.
    """

    def __init__(self, parts: list[np.ndarray]):
        if not parts:
            raise ValueError("an image stack needs at least one array")
        shapes = {part.shape[1:] for part in parts}
        if len(shapes) != 1:
            raise ValueError(f"image arrays of different shapes cannot be stacked: {sorted(shapes)}")
        self.parts = parts
        self.starts = np.cumsum([0] + [len(part) for part in parts])
        self.shape = (int(self.starts[-1]), *parts[0].shape[1:])
        self.dtype = parts[0].dtype
        self.ndim = len(self.shape)

    @classmethod
    def open(cls, files: list[Path]) -> ImageStack:
        """Memory-map each ``.npy`` file (read-only)."""
        return cls([np.load(path, mmap_mode="r", allow_pickle=False) for path in files])

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self):
        for part in self.parts:
            yield from part

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = np.concatenate(self.parts)
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, index) -> np.ndarray:
        if isinstance(index, tuple):  # rows first, then the rest of the index on what was read
            rows, rest = index[0], index[1:]
            picked = self[rows]
            return picked[rest] if isinstance(rows, (int, np.integer)) else picked[(slice(None), *rest)]
        if isinstance(index, (int, np.integer)):
            row = int(index) + len(self) if index < 0 else int(index)
            if not 0 <= row < len(self):
                raise IndexError(f"image {index} out of range for {len(self)} images")
            part = int(np.searchsorted(self.starts, row, side="right")) - 1
            return np.asarray(self.parts[part][row - self.starts[part]])
        if isinstance(index, slice):
            rows = np.arange(len(self))[index]
        else:
            rows = np.asarray(index)
            if rows.dtype == bool:
                if rows.shape != (len(self),):
                    raise IndexError(f"boolean index of shape {rows.shape} for {len(self)} images")
                rows = np.flatnonzero(rows)
            rows = np.where(rows < 0, rows + len(self), rows)
            if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
                raise IndexError(f"image index out of range for {len(self)} images")
        out = np.empty((len(rows), *self.shape[1:]), self.dtype)
        part_of = np.searchsorted(self.starts, rows, side="right") - 1
        for part in np.unique(part_of):  # one gather per file, rows kept in the order asked
            chosen = np.flatnonzero(part_of == part)
            out[chosen] = self.parts[part][rows[chosen] - self.starts[part]]
        return out
