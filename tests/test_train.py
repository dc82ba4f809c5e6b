import numpy as np
import torch

from ml.datasets import load_digits_upscaled, load_fashion_mnist
from ml.train import FoldEnsemble, TrainConfig, cross_validate, random_shift


def _subset(data, n, seed=0):
    index = np.random.default_rng(seed).permutation(len(data.labels))[:n]
    images = data.images[index]
    return (images[..., None] if images.ndim == 3 else images), data.labels[index]


def test_cross_validation_gives_out_of_fold_outputs_for_every_image():
    images, labels = _subset(load_digits_upscaled(), 600)
    config = TrainConfig(head="l2softmax", epochs=10, batch_size=32, folds=3, seed=1)
    result = cross_validate(images, labels, 10, config)
    assert result.probs.shape == (600, 10) and np.allclose(result.probs.sum(axis=1), 1)
    assert result.embeddings.shape == (600, 128)
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1, atol=1e-4)
    assert sorted(np.unique(result.fold)) == [0, 1, 2]
    assert result.accuracy(labels) > 0.8, result.fold_accuracy  # real learning on real digits
    ensemble = FoldEnsemble(result.models).eval()
    with torch.no_grad():
        probs = ensemble(torch.from_numpy(images[:5]))
    assert probs.shape == (5, 10) and torch.allclose(probs.sum(dim=1), torch.ones(5))


def test_training_is_deterministic_for_a_seed():
    images, labels = _subset(load_digits_upscaled(), 300)
    config = TrainConfig(head="softmax", epochs=2, batch_size=32, folds=2, seed=3)
    first = cross_validate(images, labels, 10, config)
    second = cross_validate(images, labels, 10, config)
    np.testing.assert_array_equal(first.probs, second.probs)


def test_fashion_mnist_subset_learns_above_chance():
    images, labels = _subset(load_fashion_mnist(), 1200)
    result = cross_validate(images, labels, 10, TrainConfig(epochs=4, batch_size=64, folds=2))
    assert result.accuracy(labels) > 0.6


def test_random_shift_moves_pixels_without_scaling():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4, 4] = 1.0
    moved = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert moved.sum() == 1.0
