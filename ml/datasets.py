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
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)


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


def load_cifar10(source: Path | str | None = None) -> ImageSet:
    """CIFAR-10 photos, 32x32 RGB: ``source`` or ``$CIFAR10_NPZ`` (an .npz with ``images`` uint8
    (N, 32, 32, 3), ``labels`` (N,) and optionally ``classes``), else with internet the 50,000
    training photos from torchvision's downloader (cached under ~/.cache/vendor-audit)."""
    path = Path(source).expanduser() if source else (Path(os.environ["CIFAR10_NPZ"]).expanduser()
                                                     if os.environ.get("CIFAR10_NPZ") else None)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: CIFAR-10 photos not found (an .npz with images and labels)")
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in ("images", "labels") if name not in data.files]
            if missing:
                raise ValueError(f"{path}: no {' or '.join(missing)} array (an .npz with images and labels)")
            images, labels = data["images"], data["labels"].astype(np.int64)
            classes = tuple(str(c) for c in data["classes"]) if "classes" in data.files else CIFAR10_CLASSES
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(labels):
            raise ValueError(f"{path}: images must be uint8 (N, H, W, 3) with one label each, got "
                             f"{images.dtype} {images.shape} and {len(labels)} labels")
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= len(classes):
            raise ValueError(f"{path}: labels must be class indices from 0 to {len(classes) - 1}")
        return ImageSet("cifar10", images, labels, classes)
    cache = Path.home() / ".cache" / "vendor-audit"
    try:  # with internet only: torchvision's downloader as the fallback
        from torchvision.datasets import CIFAR10

        data = CIFAR10(str(cache), train=True, download=True)
    except Exception as exc:  # noqa: BLE001 - any download failure means the same thing to the user
        raise FileNotFoundError(
            "CIFAR-10 not found: set CIFAR10_NPZ (or pass --source) to an .npz with images uint8 (N, 32, 32, 3) "
            f"and labels (N,), or run once with internet for torchvision's downloader ({exc})") from exc
    return ImageSet("cifar10", np.asarray(data.data, np.uint8), np.asarray(data.targets, np.int64),
                    tuple(data.classes))


CIFAR10N_FILE = "cifar10n-human-labels.npz"


def load_cifar10_workers(photos: Path | str | None = None, labels: Path | str | None = None):
    """CIFAR-10N: the labels three crowd workers gave each photo of ``photos`` (default
    ``$CIFAR10_NPZ``), read from ``labels`` (default ``$CIFAR10N_NPZ``, else ``cifar10n-human-labels.npz``
    beside the photos) and matched to the photos by ``source_index``. For benchmarks (Wei et al.,
    ICLR 2022; the labels are licensed for research, not for shipping).

    Returns
    -------
    ml.simulate.WorkerLabels
        ``votes`` (N, 3), ``majority`` and ``worst`` (N,), in the photos' order.
    """
    from ml.simulate import WorkerLabels

    photos_path = Path(photos or os.environ.get("CIFAR10_NPZ", "")).expanduser()
    if not photos_path.is_file():
        raise FileNotFoundError(f"{photos_path}: the CIFAR-10 photos (.npz with source_index) are needed to match "
                                "worker labels; set CIFAR10_NPZ")
    labels_path = Path(labels or os.environ.get("CIFAR10N_NPZ") or photos_path.with_name(CIFAR10N_FILE)).expanduser()
    if not labels_path.is_file():
        raise FileNotFoundError(f"{labels_path}: CIFAR-10N worker labels not found; set CIFAR10N_NPZ")
    with np.load(photos_path, allow_pickle=False) as data:
        if "source_index" not in data.files:
            raise ValueError(f"{photos_path}: no source_index array to match worker labels on")
        photo_index = data["source_index"]
    with np.load(labels_path, allow_pickle=False) as data:
        wanted = ["source_index", "random_label1", "random_label2", "random_label3", "aggre_label", "worse_label"]
        missing = [name for name in wanted if name not in data.files]
        if missing:
            raise ValueError(f"{labels_path}: missing array(s) {missing}")
        columns = {name: data[name] for name in wanted}
    position = {int(index): row for row, index in enumerate(columns["source_index"])}
    unmatched = [int(i) for i in photo_index if int(i) not in position]
    if unmatched:
        raise ValueError(f"{labels_path}: no worker labels for {len(unmatched)} photos (first source_index "
                         f"{unmatched[0]})")
    rows = np.array([position[int(i)] for i in photo_index])
    votes = np.stack([columns[f"random_label{k}"][rows] for k in (1, 2, 3)], axis=1).astype(np.int64)
    return WorkerLabels(votes, columns["aggre_label"][rows].astype(np.int64),
                        columns["worse_label"][rows].astype(np.int64))


def load_dataset(name: str, source: Path | str | None = None) -> ImageSet:
    """A dataset by name; ``source``: a local file where the dataset reads one (cifar10)."""
    loaders = {"fashion-mnist": load_fashion_mnist, "digits": load_digits_upscaled, "cifar10": load_cifar10}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(loaders)}")
    if name == "cifar10":
        return load_cifar10(source)
    if source is not None:
        raise ValueError(f"--source is for cifar10; {name} is found on its own")
    return loaders[name]()
