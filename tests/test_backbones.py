"""Backbones by name: families build and give features of the stated shape, local state dicts load,
EfficientNet-Lite0 works offline with its packaged weights, and bad names fail clearly."""

import numpy as np
import pytest
import torch
import torchvision

from ml.backbones import (
    BackboneError, check_backbone_name, check_weights, choose_backbone, load_backbone,
)
from ml.efficientnet_lite import EfficientNetLite0, convert_state_dict, packaged_weights_path


def _features(backbone, images: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return backbone(backbone.prepare(torch.from_numpy(images)))


@pytest.mark.parametrize("name, dim, size", [
    ("resnet18", 512, 128), ("mobilenet_v3_small", 1024, 128), ("efficientnet_b0", 1280, 128),
    ("convnext_tiny", 768, 128), ("vit_b_16", 768, 224),
])
def test_torchvision_families_give_features_of_their_width(name, dim, size):
    backbone = load_backbone(name, "none", image_side=40)
    images = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    x = backbone.prepare(torch.from_numpy(images))
    assert x.shape == (2, 3, size, size)  # tiny photos go to 128 px; ViT keeps its fixed 224
    assert _features(backbone, images).shape == (2, dim)
    assert backbone.feature_dim == dim


def test_efficientnet_lite0_loads_its_packaged_weights_offline():
    published = torch.load(packaged_weights_path(), map_location="cpu", weights_only=True)
    converted = convert_state_dict(published)
    own = EfficientNetLite0().state_dict()
    assert set(converted) == set(own)  # every published tensor has a place, and every place a tensor
    assert all(converted[k].shape == own[k].shape for k in own)
    backbone = load_backbone("efficientnet_lite0", "auto", image_side=32)
    assert backbone.input_size == 128 and backbone.native_size == 224
    assert backbone.mean == (0.5, 0.5, 0.5) and backbone.std == (0.5, 0.5, 0.5)  # inputs in [-1, 1]
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[1] = 255
    x = backbone.prepare(torch.from_numpy(images))
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    features = _features(backbone, images)
    assert features.shape == (2, 1280) and torch.isfinite(features).all()
    assert not torch.allclose(features[0], features[1])


def test_grayscale_images_are_repeated_to_three_channels():
    backbone = load_backbone("mobilenet_v3_small", "none", image_side=20)
    images = np.random.default_rng(1).integers(0, 256, (3, 20, 20, 1), dtype=np.uint8)
    assert _features(backbone, images).shape == (3, 1024)


def test_local_state_dict_is_loaded_and_a_foreign_classifier_skipped(tmp_path):
    source = torchvision.models.resnet18(num_classes=5)  # fine-tuned elsewhere for 5 classes
    torch.nn.init.normal_(source.conv1.weight)
    path = tmp_path / "resnet18-ours.pt"
    torch.save(source.state_dict(), path)
    backbone = load_backbone("resnet18", str(path), image_side=32)
    assert torch.equal(backbone.trunk.conv1.weight, source.conv1.weight)
    assert backbone.identity.startswith("resnet18:") and backbone.weights == str(path)
    images = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    source.fc = torch.nn.Identity()
    with torch.no_grad():
        expected = source.eval()(backbone.prepare(torch.from_numpy(images)))
    assert torch.allclose(_features(backbone, images), expected, atol=1e-5)


def test_bad_weights_files_are_refused_clearly(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        load_backbone("resnet18", str(tmp_path / "missing.pt"))
    other = tmp_path / "mobilenet.pt"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), other)
    with pytest.raises(BackboneError, match="do not fit this backbone"):
        load_backbone("resnet18", str(other))
    pickled = tmp_path / "model.pt"
    torch.save(torchvision.models.resnet18(), pickled)  # a whole pickled module, not a state dict
    with pytest.raises(BackboneError, match="weights_only"):
        load_backbone("resnet18", str(pickled))


def test_torchvision_weights_offline_and_uncached_name_the_setting_and_the_alternative(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache
    for variable in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")  # nothing listens: the download fails for real
    with pytest.raises(BackboneError) as caught:
        load_backbone("resnet18", "IMAGENET1K_V1")
    message = str(caught.value)
    assert "'IMAGENET1K_V1'" in message and "resnet18-f37072fd.pth" in message
    assert "weights:" in message and "local state dict" in message and "efficientnet_lite0" in message


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(BackboneError, match="did you mean resnet18.*resnet50"):
        check_backbone_name("resnet81")
    with pytest.raises(BackboneError, match="IMAGENET1K_V1"):
        check_weights("resnet18", "IMAGENET9")
    with pytest.raises(BackboneError, match="from scratch"):
        check_weights("small_cnn", "DEFAULT")


def test_auto_picks_small_cnn_for_small_grayscale_and_the_pretrained_backbone_for_photos():
    small = choose_backbone("auto", "auto", 28, 1)
    assert small.name == "small_cnn" and "grayscale" in small.reason
    photos = choose_backbone("auto", "auto", 32, 3)
    assert photos.name == "efficientnet_lite0" and "pretrained" in photos.reason
    assert choose_backbone("auto", "auto", 64, 1).name == "efficientnet_lite0"  # large grayscale: photos too
    assert choose_backbone("resnet50", "none", 28, 1).name == "resnet50"
