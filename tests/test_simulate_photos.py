"""``vendor-audit simulate --dataset cifar10`` from a local .npz: photos, pair confusions, composites."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ml.datasets import CIFAR10_CLASSES, load_cifar10
from ml.simulate import CIFAR10_PAIRS, simulate_labels
from pipelines.cli import main


def _npz(path, n=60, side=8):
    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8),
             labels=(np.arange(n) % 10).astype(np.int8), classes=np.array(CIFAR10_CLASSES))
    return path


def test_simulate_cifar10_from_a_source_file_writes_colour_photos_with_pair_confusions(tmp_path):
    source = _npz(tmp_path / "photos.npz")
    home = tmp_path / "home"
    assert main(["simulate", "--dataset", "cifar10", "--source", str(source), "--home", str(home),
                 "--vendors", "a=0.0,b=0.25", "--per-vendor", "12", "--noise", "pairs"]) in (0, None)
    truth = pd.read_csv(home / "truth.csv", dtype=str, keep_default_na=False)
    assert len(truth) == 24
    wrong = truth[truth["given_label"] != truth["true_label"]]
    assert set(wrong["vendor"]) == {"b"} and len(wrong) == 3
    pairs = {frozenset((CIFAR10_CLASSES[x], CIFAR10_CLASSES[y])) for x, y in CIFAR10_PAIRS}
    assert all(frozenset(p) in pairs for p in zip(wrong["given_label"], wrong["true_label"]))
    image = Image.open(home / "landing" / "b" / "batch-001" / "images" / "000012.png")
    assert image.mode == "RGB" and image.size == (8, 8)
    assert "cat" in (home / "vendor-audit.yaml").read_text()


def test_cifar10_from_the_environment_and_ambiguous_composites(tmp_path, monkeypatch):
    monkeypatch.setenv("CIFAR10_NPZ", str(_npz(tmp_path / "env.npz")))
    data = load_cifar10()
    assert data.name == "cifar10" and data.images.shape == (60, 8, 8, 3) and data.classes == CIFAR10_CLASSES
    sim = simulate_labels(data, {"a": 0.0}, 10, seed=1, ambiguous=0.3)
    composed = np.flatnonzero(sim.ambiguous)
    assert len(composed) == 3 and not sim.wrong.any()
    first, second = data.images[sim.source[composed[0]]], sim.images[composed[0]]
    assert not np.array_equal(first, second) and second.shape == (8, 8, 3)


def test_a_bad_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_cifar10(tmp_path / "missing.npz")
    np.savez(tmp_path / "gray.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"uint8 \(N, H, W, 3\)"):
        load_cifar10(tmp_path / "gray.npz")
