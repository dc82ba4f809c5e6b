"""Image backbones by name: the small CNN trained from scratch, EfficientNet-Lite0 (offline ImageNet
weights), or any torchvision classification model.

A pretrained backbone is a feature extractor: float (B, 3, H, W), normalised as it expects, ->
features (B, D). :meth:`Backbone.prepare` turns a uint8 batch (B, H, W, C) into that input (channels
repeated for grayscale, resized to the backbone's input size, normalised), so callers keep images as
uint8 until a batch is converted.

Weights (the ``weights`` setting):

- ``auto``: the backbone's pretrained weights (``DEFAULT`` for torchvision models, the packaged
  ImageNet weights for ``efficientnet_lite0``); none for ``small_cnn``;
- ``none``: random initialisation (only sensible for fine-tuning);
- a torchvision weights name (``DEFAULT``, ``IMAGENET1K_V2``...): fetched once into the torch cache
  (``$TORCH_HOME``) where there is internet;
- a local file: a state dict, loaded with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ml import efficientnet_lite
from ml.files import file_sha256

log = logging.getLogger(__name__)

SMALL_CNN = "small_cnn"
EFFICIENTNET_LITE0 = "efficientnet_lite0"
AUTO = "auto"
NO_WEIGHTS = "none"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Upscaling a tiny image past this side adds compute, not information (CIFAR's 32 px -> 128 px).
MIN_FEATURE_SIZE = 128
# Transformers whose position embeddings or windows fix the input size.
FIXED_SIZE_PREFIXES = ("vit_", "swin", "maxvit")


class BackboneError(ValueError):
    """An unknown backbone or weights name, or weights that cannot be had; the message says what to set."""


def torchvision_names() -> list[str]:
    """Names of torchvision's classification models (``resnet18``, ``mobilenet_v2``, ``vit_b_16``...)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def backbone_names() -> list[str]:
    return [SMALL_CNN, EFFICIENTNET_LITE0, *torchvision_names()]


def check_backbone_name(name: str) -> str:
    """``name`` if it names a backbone (or is ``auto``), else a BackboneError listing the valid names."""
    if name == AUTO or name in (SMALL_CNN, EFFICIENTNET_LITE0) or name in torchvision_names():
        return name
    import difflib

    close = difflib.get_close_matches(name, backbone_names(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise BackboneError(f"unknown backbone {name!r}{hint}: use auto, {SMALL_CNN}, {EFFICIENTNET_LITE0} or a torchvision "
                        f"classification model: {', '.join(torchvision_names())}")


def is_weights_path(weights: str) -> bool:
    """A weights setting that names a file rather than a weights name."""
    return "/" in weights or "\\" in weights or weights.endswith((".pt", ".pth", ".bin", ".ckpt")) or weights.startswith("~")


def torchvision_weight_names(name: str) -> list[str]:
    """The weights names torchvision knows for model ``name`` (``DEFAULT`` first)."""
    import torchvision

    enum = torchvision.models.get_model_weights(name)
    return ["DEFAULT", *(w.name for w in enum)]


def check_weights(backbone: str, weights: str) -> str:
    """``weights`` if it suits ``backbone`` (a name it has, ``auto``, ``none`` or a file path), else a
    BackboneError listing the valid names. A file's existence is checked when it is loaded."""
    if weights in (AUTO, NO_WEIGHTS) or is_weights_path(weights) or backbone == AUTO:
        return weights
    if backbone == SMALL_CNN:
        raise BackboneError(f"weights {weights!r}: {SMALL_CNN} is trained from scratch; use auto or none")
    if backbone == EFFICIENTNET_LITE0:
        if weights in ("DEFAULT", "IMAGENET1K_V1"):
            return weights
        raise BackboneError(f"unknown weights {weights!r} for {EFFICIENTNET_LITE0}: use auto, DEFAULT (the packaged "
                            "ImageNet weights), none, or the path of a state dict")
    valid = torchvision_weight_names(backbone)
    if weights not in valid:
        raise BackboneError(f"unknown weights {weights!r} for {backbone}: use auto, none, one of {', '.join(valid)}, "
                            "or the path of a state dict")
    return weights


@dataclass(frozen=True)
class BackboneChoice:
    """A resolved backbone: ``name`` (never ``auto``), ``weights`` setting and why it was chosen."""

    name: str
    weights: str
    reason: str


def choose_backbone(backbone: str, weights: str, image_side: int, channels: int) -> BackboneChoice:
    """Resolve ``auto``: small grayscale images (side <= 32 px, 1 channel) -> ``small_cnn``; anything
    else (photos) -> ``efficientnet_lite0``, the pretrained backbone available offline everywhere."""
    check_backbone_name(backbone)
    check_weights(backbone, weights)
    if backbone != AUTO:
        return BackboneChoice(backbone, weights, "set in the settings")
    if channels == 1 and image_side <= 32:
        choice = BackboneChoice(SMALL_CNN, NO_WEIGHTS if weights == AUTO else weights,
                                f"small grayscale images ({image_side} px, 1 channel): the small CNN from scratch")
    else:
        choice = BackboneChoice(EFFICIENTNET_LITE0, weights,
                                f"{'colour' if channels == 3 else 'grayscale'} images of {image_side} px: "
                                "ImageNet-pretrained EfficientNet-Lite0 (weights installed with vendor-audit)")
    check_weights(choice.name, choice.weights)
    return choice  # the caller logs the choice with the training plan


class Backbone(nn.Module):
    """A pretrained feature extractor: ``forward`` float (B, 3, S, S) normalised -> features (B, D).

    ``name``, ``weights`` (the setting), ``identity`` (name and exact weights, for caches),
    ``native_size`` (the input side it was trained at), ``input_size`` (the side images are resized
    to), ``mean``/``std`` (its normalisation of [0, 1] pixels), ``feature_dim`` (D).
    """

    def __init__(self, name: str, weights: str, identity: str, trunk: nn.Module, feature_dim: int,
                 native_size: int, mean: tuple[float, ...], std: tuple[float, ...], input_size: int | None = None):
        super().__init__()
        self.name, self.weights, self.identity = name, weights, identity
        self.trunk = trunk
        self.feature_dim = feature_dim
        self.native_size = native_size
        self.input_size = input_size or native_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.register_buffer("_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C) -> float (B, 3, S, S), S = ``input_size``, normalised for the backbone."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              antialias=True, align_corners=False)
        return (x - self._mean) / self._std


def feature_size(native_size: int, image_side: int) -> int:
    """The side images are resized to: the backbone's own size, but tiny images only to 128 px."""
    return min(native_size, max(MIN_FEATURE_SIZE, image_side))


def load_backbone(name: str, weights: str = AUTO, image_side: int | None = None) -> Backbone:
    """Build backbone ``name`` (not ``small_cnn``: it has no pretrained features) with ``weights``.

    ``image_side`` (the images' side) picks the input size (:func:`feature_size`); None: native size.

    Raises
    ------
    BackboneError
        Unknown name or weights; torchvision weights not in the torch cache and not downloadable
        (the message names the setting and the local-file alternative); an unreadable weights file.
    """
    check_backbone_name(name)
    check_weights(name, weights)
    if name in (SMALL_CNN, AUTO):
        raise BackboneError(f"backbone {name!r} has no pretrained features to load")
    if name == EFFICIENTNET_LITE0:
        backbone = _efficientnet_lite0(weights)
    else:
        backbone = _torchvision(name, weights)
    if image_side is not None and not name.startswith(FIXED_SIZE_PREFIXES):
        backbone.input_size = feature_size(backbone.native_size, image_side)
    return backbone.eval()


def _efficientnet_lite0(weights: str) -> Backbone:
    model = efficientnet_lite.EfficientNetLite0()
    if weights == NO_WEIGHTS:
        identity = f"{EFFICIENTNET_LITE0}:random"
    else:
        path = Path(weights).expanduser() if is_weights_path(weights) else efficientnet_lite.packaged_weights_path()
        state = _read_state_dict(path, weights)
        try:
            state = efficientnet_lite.to_own_names(state)
        except ValueError as exc:
            raise BackboneError(f"weights {weights!r}: not an EfficientNet-Lite0 state dict ({exc})") from exc
        _load_into(model, state, weights)  # strictly, but the classifier when its class count differs
        identity = f"{EFFICIENTNET_LITE0}:{file_sha256(path)[:16]}"
    return Backbone(EFFICIENTNET_LITE0, weights, identity, _LiteTrunk(model), efficientnet_lite.FEATURE_DIM,
                    efficientnet_lite.NATIVE_SIZE, efficientnet_lite.MEAN, efficientnet_lite.STD)


class _LiteTrunk(nn.Module):
    def __init__(self, model: efficientnet_lite.EfficientNetLite0):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)


def _torchvision(name: str, weights: str) -> Backbone:
    import torchvision

    size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
    if weights in (NO_WEIGHTS,) or is_weights_path(weights):
        model = torchvision.models.get_model(name, weights=None)
        if weights == NO_WEIGHTS:
            identity = f"{name}:random"
        else:
            path = Path(weights).expanduser()
            _load_into(model, _read_state_dict(path, weights), weights)
            identity = f"{name}:{file_sha256(path)[:16]}"
        default = torchvision.models.get_model_weights(name).DEFAULT
        size, mean, std = _preset(default, size, mean, std)
    else:
        enum = torchvision.models.get_model_weights(name)
        chosen = enum.DEFAULT if weights in (AUTO, "DEFAULT") else enum[weights]
        model = torchvision.models.get_model(name, weights=None)
        _load_into(model, _fetch(name, chosen, weights), weights)
        identity = f"{name}:{chosen.name}:{Path(chosen.url).name}"
        size, mean, std = _preset(chosen, size, mean, std)
    trunk, dim = _strip_classifier(model, name)
    return Backbone(name, weights, identity, trunk, dim, size, mean, std)


def _preset(weights_enum, size, mean, std):
    """Input size and normalisation of a torchvision weights entry's evaluation transform."""
    try:
        preset = weights_enum.transforms()
        return int(preset.crop_size[0]), tuple(preset.mean), tuple(preset.std)
    except (AttributeError, TypeError, IndexError):
        return size, mean, std


def _fetch(name: str, chosen, setting: str) -> dict[str, torch.Tensor]:
    """The state dict of torchvision weights ``chosen``: from the torch cache, else downloaded once."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(chosen.url).name
    if cached.is_file():
        return torch.load(cached, map_location="cpu", weights_only=True)
    log.info("downloading %s weights %s into %s", name, chosen.name, cached.parent)
    try:
        return chosen.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # noqa: BLE001 - no internet, a proxy, a broken download: the same remedy
        raise BackboneError(
            f"weights {setting!r} for backbone {name!r}: not in the torch cache ({cached}) and the download from "
            f"{chosen.url} failed ({exc.__class__.__name__}: {exc}). Download that file where there is internet and "
            f"copy it to {cached}, or set 'weights:' in vendor-audit.yaml to the path of a local state dict, or use "
            f"backbone: {EFFICIENTNET_LITE0} (its weights are installed with vendor-audit)") from exc


def _read_state_dict(path: Path, setting: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BackboneError(f"weights {setting!r}: file {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickled code, a truncated file...: not loadable safely
        raise BackboneError(f"weights {setting!r}: {path} is not a state dict loadable with weights_only=True "
                            f"({exc.__class__.__name__})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"weights {setting!r}: {path} holds no state dict (a mapping of names to tensors)")
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], setting: str) -> None:
    """Load strictly, except the final classifier when its class count differs (fine-tuned elsewhere)."""
    last = _last_linear_name(model)
    own = model.state_dict()
    mismatched = [k for k in (f"{last}.weight", f"{last}.bias") if k in state and state[k].shape != own[k].shape]
    if mismatched:
        state = {**{k: v for k, v in state.items() if not k.startswith(f"{last}.")},
                 **{k: v for k, v in own.items() if k.startswith(f"{last}.")}}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BackboneError(f"weights {setting!r} do not fit this backbone: {str(exc).splitlines()[0]} "
                            f"{str(exc).splitlines()[1:3]}") from exc


def _last_linear_name(model: nn.Module) -> str | None:
    last = None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = module_name
    return last


def _strip_classifier(model: nn.Module, name: str) -> tuple[nn.Module, int]:
    """Replace the final linear layer by the identity: the model then returns its features (B, D)."""
    last = _last_linear_name(model)
    if last is None:
        raise BackboneError(f"backbone {name!r} has no linear classifier to take features before; choose another")
    parent = model.get_submodule(last.rpartition(".")[0]) if "." in last else model
    dim = parent.get_submodule(last.rpartition(".")[2]).in_features
    setattr(parent, last.rpartition(".")[2], nn.Identity())
    return model, int(dim)


def describe(backbone: Backbone | None) -> dict:
    """Plain facts for logs and MLflow params."""
    if backbone is None:
        return {"backbone": SMALL_CNN, "weights": NO_WEIGHTS}
    return {"backbone": backbone.name, "weights": backbone.weights, "weights_identity": backbone.identity,
            "input_size": backbone.input_size, "feature_dim": backbone.feature_dim}


def image_side_and_channels(images: np.ndarray) -> tuple[int, int]:
    """(side, channels) of uint8 images (N, H, W) or (N, H, W, C)."""
    return int(max(images.shape[1:3])), int(images.shape[3]) if images.ndim == 4 else 1
