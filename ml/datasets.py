"""Real image datasets used for the demo, tests and benchmarks (no hub downloads at run time)."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
DIGITS_CLASSES = tuple(str(d) for d in range(10))


@dataclass(frozen=True)
class ImageSet:
    """``images``: uint8 (N, H, W) or (N, H, W, C); ``labels``: int64 (N,); ``classes``: names by index."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist_dir() -> Path:
    """Folder with the original idx .gz files: ``$FASHION_MNIST_DIR``, Debian's package, or torchvision's cache."""
    candidates = [Path(p) for p in [os.environ.get("FASHION_MNIST_DIR")] if p] + list(FASHION_MNIST_DIRS)
    for folder in candidates:
        if (folder / "train-images-idx3-ubyte.gz").is_file():
            return folder
    cache = Path.home() / ".cache" / "vendor-audit" / "FashionMNIST" / "raw"
    if (cache / "train-images-idx3-ubyte.gz").is_file():
        return cache
    try:  # with internet only: torchvision's downloader as the fallback
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(cache.parent.parent), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - any download failure means the same thing to the user
        raise FileNotFoundError(
            "Fashion-MNIST not found: install Debian's package 'dataset-fashion-mnist' "
            "(apt-get install dataset-fashion-mnist), or set FASHION_MNIST_DIR to a folder with "
            f"train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz ({exc})"
        ) from exc
    return cache


def load_fashion_mnist() -> ImageSet:
    """The 60,000 Fashion-MNIST training images, 28x28 grayscale."""
    folder = fashion_mnist_dir()
    images = _read_idx(folder / "train-images-idx3-ubyte.gz")
    labels = _read_idx(folder / "train-labels-idx1-ubyte.gz").astype(np.int64)
    return ImageSet("fashion-mnist", images, labels, FASHION_MNIST_CLASSES)


def load_digits_upscaled(scale: int = 3) -> ImageSet:
    """scikit-learn's 1,797 real 8x8 digits, rescaled to uint8 and upscaled ``scale`` times (nearest)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    return ImageSet("digits", images, digits.target.astype(np.int64), DIGITS_CLASSES)


def load_dataset(name: str) -> ImageSet:
    loaders = {"fashion-mnist": load_fashion_mnist, "digits": load_digits_upscaled}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(loaders)}")
    return loaders[name]()
