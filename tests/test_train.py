from dataclasses import replace

import numpy as np
import pytest
import torch

from ml.datasets import load_digits_upscaled, load_fashion_mnist
from ml.train import FoldEnsemble, TrainConfig, _cpu_has_native_bfloat16, cross_validate, random_shift, resolve_precision


def _subset(data, n, seed=0):
    index = np.random.default_rng(seed).permutation(len(data.labels))[:n]
    images = data.images[index]
    return (images[..., None] if images.ndim == 3 else images), data.labels[index]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_cross_validation_gives_out_of_fold_outputs_for_every_image(precision):
    images, labels = _subset(load_digits_upscaled(), 600)
    config = TrainConfig(head="l2softmax", epochs=10, batch_size=32, folds=3, seed=1, precision=precision)
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


def test_training_is_deterministic_for_a_seed_in_either_precision():
    images, labels = _subset(load_digits_upscaled(), 300)
    config = TrainConfig(head="softmax", epochs=2, batch_size=32, folds=2, seed=3)
    first = cross_validate(images, labels, 10, config)
    second = cross_validate(images, labels, 10, config)
    np.testing.assert_array_equal(first.probs, second.probs)
    bf16 = replace(config, precision="bfloat16")
    first, second = cross_validate(images, labels, 10, bf16), cross_validate(images, labels, 10, bf16)
    np.testing.assert_array_equal(first.probs, second.probs)
    assert not np.array_equal(first.probs, cross_validate(images, labels, 10, config).probs)  # the steps ran in bfloat16


def test_precision_auto_is_bfloat16_on_a_gpu_and_where_the_cpu_has_it():
    assert resolve_precision("auto", torch.device("cuda"))[0] == "bfloat16"
    native = _cpu_has_native_bfloat16()
    assert resolve_precision("auto", torch.device("cpu"))[0] == ("bfloat16" if native else "float32")
    assert resolve_precision("float32", torch.device("cuda")) == ("float32", "set in the settings")
    with pytest.raises(ValueError, match="float32, bfloat16 or auto"):
        resolve_precision("fp16", torch.device("cpu"))


def test_fashion_mnist_subset_learns_above_chance():
    images, labels = _subset(load_fashion_mnist(), 1200)
    result = cross_validate(images, labels, 10, TrainConfig(epochs=4, batch_size=64, folds=2))
    assert result.accuracy(labels) > 0.6


def test_random_shift_moves_pixels_without_scaling():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4, 4] = 1.0
    moved = random_shift(x, 2, torch.Generator().manual_seed(0))
    assert moved.sum() == 1.0


# ---- probe and fine-tune ------------------------------------------------------------------------

import io  # noqa: E402

from ml.backbones import load_backbone  # noqa: E402
from ml.train import (  # noqa: E402
    FinetuneEnsemble, ProbeEnsemble, cross_validate_probe, ensemble_from_payload, ensemble_payload,
    fold_splits, generalized_cross_entropy, resolve_heads, resolve_training, score_out_of_sample, train_folds,
)


def _clusters(n: int, k: int, dim: int, noise: float, seed: int = 0):
    """Features (n, dim) in k separated clusters, the true classes and labels with ``noise`` wrong."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, k, n)
    centres = rng.normal(0, 1, (k, dim)) * 3
    features = (centres[truth] + rng.normal(0, 1, (n, dim))).astype(np.float32) * 5 + 7  # unstandardised
    given = truth.copy()
    wrong = rng.choice(n, int(noise * n), replace=False)
    given[wrong] = (truth[wrong] + rng.integers(1, k, len(wrong))) % k
    return features, truth, given


def test_probe_learns_through_noisy_labels():
    features, truth, given = _clusters(600, 4, 32, noise=0.2)
    result = cross_validate_probe(features, given, 4, TrainConfig(folds=3, seed=0))
    assert result.probs.shape == (600, 4) and result.embeddings.shape == (600, 128)
    np.testing.assert_allclose(np.linalg.norm(result.embeddings, axis=1), 1, atol=1e-4)
    assert result.accuracy(truth) > 0.95  # wrong labels are not learned
    assert result.stats["training"] == "probe" and result.stats["train_images_per_s"] > 0


def test_probe_folds_never_see_their_own_images():
    # pure noise features with random labels: a head that saw its held-out images would beat chance
    rng = np.random.default_rng(0)
    features = rng.normal(0, 1, (400, 64)).astype(np.float32)
    labels = rng.integers(0, 4, 400)
    result = cross_validate_probe(features, labels, 4, TrainConfig(folds=4, seed=0))
    assert result.accuracy(labels) < 0.34
    # each fold's standardisation was fitted on its training images only
    for head, (train_idx, test_idx) in zip(result.models, fold_splits(labels, 4, 4, 0)):
        assert np.allclose(head.mean.numpy(), features[train_idx].mean(axis=0), atol=1e-5)
        assert not np.allclose(head.mean.numpy(), features.mean(axis=0), atol=1e-4)
        assert (result.fold[test_idx] == result.fold[test_idx[0]]).all()


def test_generalized_cross_entropy_counts_a_confident_wrong_label_less_than_cross_entropy():
    logits = torch.tensor([[6.0, 0.0, 0.0]])
    wrong = torch.tensor([1])
    gce = generalized_cross_entropy(logits, wrong, 0.7)
    assert 0 < gce < 1 / 0.7 < torch.nn.functional.cross_entropy(logits, wrong)


def _photos(n: int, seed: int = 0):
    """Tiny colour images of two kinds (reddish horizontal stripes, bluish vertical) and their classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 60, (n, 16, 16, 3)).astype(np.uint8)
    for i, c in enumerate(labels):
        if c == 0:
            images[i, ::4, :, 0] = 250
        else:
            images[i, :, ::4, 2] = 250
    return images, labels


def test_probe_on_efficientnet_lite0_features_end_to_end(tmp_path):
    images, labels = _photos(24)
    config = TrainConfig(folds=2, backbone="efficientnet_lite0", weights="auto", training="probe", batch_size=8)
    backbone = load_backbone("efficientnet_lite0", "auto")
    backbone.input_size = 64
    result = train_folds(images, labels, 2, config, feature_cache=tmp_path, backbone=backbone)
    assert result.accuracy(labels) >= 0.9  # pretrained features tell stripes apart at once
    assert result.stats["backbone"] == "efficientnet_lite0" and result.stats["features_computed"] == 24
    again = train_folds(images, labels, 2, config, feature_cache=tmp_path, backbone=backbone)
    assert again.stats["features_computed"] == 0 and again.stats["features_cached"] == 24
    np.testing.assert_allclose(again.probs, result.probs, atol=1e-6)  # same features, same seed

    ensemble = result.ensemble
    assert isinstance(ensemble, ProbeEnsemble)
    buffer = io.BytesIO()
    torch.save(ensemble_payload(ensemble, ("h", "v"), "softmax"), buffer)
    loaded = ensemble_from_payload(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), 2, tmp_path)
    payload = ensemble_payload(ensemble, ("h", "v"), "softmax")
    stored = sum(t.numel() for member in payload["members"] for t in member.values())
    assert stored < 2 * 200_000  # the heads only: the backbone is rebuilt from its name and weights setting
    member = result.fold.copy()
    probs, embeddings = score_out_of_sample(loaded, images, member)
    np.testing.assert_allclose(probs, result.probs, atol=1e-5)  # a later image scored like out-of-fold
    assert embeddings.shape == (24, 128)
    with torch.no_grad():
        assert ensemble(torch.from_numpy(images[:3])).shape == (3, 2)


def test_probe_reads_memory_mapped_deliveries_as_it_reads_an_array(tmp_path):
    from ml.image_stack import ImageStack

    images, labels = _photos(16)
    np.save(tmp_path / "first.npy", images[:10])
    np.save(tmp_path / "second.npy", images[10:])
    stack = ImageStack.open([tmp_path / "first.npy", tmp_path / "second.npy"])
    config = TrainConfig(folds=2, backbone="efficientnet_lite0", weights="auto", training="probe", batch_size=8)
    backbone = load_backbone("efficientnet_lite0", "auto")
    backbone.input_size = 64
    from_array = train_folds(images, labels, 2, config, feature_cache=tmp_path / "a", backbone=backbone)
    from_stack = train_folds(stack, labels, 2, config, feature_cache=tmp_path / "b", backbone=backbone)
    assert from_stack.stats["features_computed"] == 16
    np.testing.assert_allclose(from_stack.probs, from_array.probs, atol=1e-6)


def test_finetune_runs_on_the_cpu_on_a_few_images(tmp_path):
    from ml.image_stack import ImageStack

    images, labels = _photos(12)
    config = TrainConfig(folds=2, epochs=1, batch_size=4, backbone="mobilenet_v3_small", weights="none",
                         training="finetune")
    backbone = load_backbone("mobilenet_v3_small", "none")
    backbone.input_size = 32
    result = train_folds(images, labels, 2, config, device=torch.device("cpu"), backbone=backbone)
    assert result.probs.shape == (12, 2) and np.allclose(result.probs.sum(axis=1), 1)
    assert result.stats["training"] == "finetune" and result.stats["device"] == "cpu"
    assert result.stats["train_images_per_s"] > 0 and result.stats["peak_memory_mb"] > 0
    assert isinstance(result.ensemble, FinetuneEnsemble)
    buffer = io.BytesIO()
    torch.save(ensemble_payload(result.ensemble, ("h", "v"), "softmax"), buffer)
    loaded = ensemble_from_payload(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), 2)
    probs, _ = score_out_of_sample(loaded, images, result.fold)
    np.testing.assert_allclose(probs, result.probs, atol=1e-4)
    # memory-mapped deliveries are read batch by batch to the same result
    np.save(tmp_path / "first.npy", images[:5])
    np.save(tmp_path / "second.npy", images[5:])
    stack = ImageStack.open([tmp_path / "first.npy", tmp_path / "second.npy"])
    from_stack = train_folds(stack, labels, 2, config, device=torch.device("cpu"), backbone=backbone)
    np.testing.assert_allclose(from_stack.probs, result.probs, atol=1e-5)


def test_training_mode_auto_is_probe_on_a_cpu_and_scratch_for_the_small_cnn():
    assert resolve_training("auto", "efficientnet_lite0", torch.device("cpu"))[0] == "probe"
    assert resolve_training("auto", "resnet50", torch.device("cuda"))[0] == "finetune"
    assert resolve_training("probe", "resnet50", torch.device("cuda"))[0] == "probe"
    assert resolve_training("auto", "small_cnn", torch.device("cuda"))[0] == "scratch"


def test_heads_auto_are_l2softmax_from_scratch_and_softmax_on_pretrained_features():
    assert resolve_heads("auto", "scratch")[0] == ("l2softmax",)
    assert resolve_heads("auto", "probe")[0] == ("softmax",)
    assert resolve_heads("auto", "finetune")[0] == ("softmax",)
    assert resolve_heads(("l2softmax",), "probe") == (("l2softmax",), "set in the settings")
