"""The feature cache: computed once per image content and backbone, reused, recomputed only for a
changed image."""

import numpy as np

from ml.backbones import load_backbone
from ml.features import backbone_key, compute_features, content_keys, extract_features


def _backbone(input_size: int = 64):
    backbone = load_backbone("mobilenet_v3_small", "none")
    backbone.input_size = input_size  # small inputs keep the test fast
    return backbone


def test_second_run_computes_nothing_and_a_changed_image_only_itself(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 24, 24, 3), dtype=np.uint8)
    backbone = _backbone()
    first, stats = extract_features(backbone, images, tmp_path, batch_size=4)
    assert first.shape == (6, 1024) and stats.n_computed == 6 and stats.n_cached == 0
    assert stats.images_per_second > 0
    assert np.allclose(first, compute_features(backbone, images), atol=1e-5)

    again, stats = extract_features(backbone, images, tmp_path)
    assert stats.n_computed == 0 and stats.n_cached == 6
    assert np.array_equal(again, first)

    changed = images.copy()
    changed[3, 0, 0, 0] ^= 0xFF
    updated, stats = extract_features(backbone, changed, tmp_path)
    assert stats.n_computed == 1 and stats.n_cached == 5
    assert np.array_equal(np.delete(updated, 3, axis=0), np.delete(first, 3, axis=0))
    assert not np.array_equal(updated[3], first[3])


def test_cache_is_keyed_by_backbone_and_input_size(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (3, 24, 24, 3), dtype=np.uint8)
    small, large = _backbone(64), _backbone(96)
    assert backbone_key(small) != backbone_key(large)
    extract_features(small, images, tmp_path)
    _, stats = extract_features(large, images, tmp_path)
    assert stats.n_computed == 3  # other inputs, other features: nothing reused wrongly
    _, stats = extract_features(_backbone(64), images, tmp_path)
    assert stats.n_computed == 0  # the same backbone built again reuses its features


def test_duplicate_images_are_computed_once_and_grayscale_works(tmp_path):
    image = np.random.default_rng(2).integers(0, 256, (1, 20, 20, 1), dtype=np.uint8)
    images = np.concatenate([image, image, image[:, ::-1]])
    features, stats = extract_features(_backbone(), images, tmp_path)
    assert stats.n_computed == 2
    assert np.array_equal(features[0], features[1])
    keys = content_keys(images)
    assert keys[0] == keys[1] != keys[2] and len(keys[0]) == 64
    # read back, every copy of a photo delivered twice comes from the cache (not only the last copy)
    again, stats = extract_features(_backbone(), images, tmp_path)
    assert stats.n_computed == 0 and stats.n_cached == 3 and np.array_equal(again, features)


def test_a_damaged_cache_chunk_is_recomputed_not_fatal(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, (2, 20, 20, 3), dtype=np.uint8)
    backbone = _backbone()
    first, _ = extract_features(backbone, images, tmp_path)
    for chunk in (tmp_path / backbone_key(backbone)).glob("*.npz"):
        chunk.write_bytes(b"not an npz")
    again, stats = extract_features(backbone, images, tmp_path)
    assert stats.n_computed == 2 and np.allclose(again, first, atol=1e-5)
