"""A small CNN for small images, trained with K-fold cross-validation.

Every image gets out-of-fold class probabilities and an embedding from a model that never saw it.
Two heads: ``softmax`` (a plain linear classifier) and ``l2softmax`` (features L2-normalised and
scaled before a bias-free classifier, Ranjan et al. 2017), which gives an embedding made for
nearest-neighbour comparisons.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch import nn

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict], None]


@dataclass(frozen=True)
class TrainConfig:
    head: str = "softmax"
    epochs: int = 8
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 5e-4
    folds: int = 5
    seed: int = 0
    l2_scale: float = 16.0
    augment_shift: int = 2


def pick_device() -> torch.device:
    """CUDA when present, else the CPU (with all its cores)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class SmallCNN(nn.Module):
    """Three conv blocks, global pooling, a 128-d embedding and a classifier head.

    Input: float (B, C, H, W) in [0, 1]. ``forward`` returns logits (B, K); ``embed`` returns the
    L2-normalised embedding (B, 128).
    """

    def __init__(self, in_channels: int, n_classes: int, head: str = "softmax", l2_scale: float = 16.0):
        super().__init__()
        if head not in ("softmax", "l2softmax"):
            raise ValueError(f"unknown head {head!r}")
        self.head = head
        self.l2_scale = l2_scale

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.features = nn.Sequential(
            block(in_channels, 32), nn.MaxPool2d(2),
            block(32, 64), nn.MaxPool2d(2),
            block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.project = nn.Sequential(nn.Linear(128, 128), nn.BatchNorm1d(128), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(128, n_classes, bias=(head == "softmax"))

    def features_of(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features_of(x)
        if self.head == "l2softmax":
            z = self.l2_scale * F.normalize(z, dim=1)
        return self.classifier(z)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features_of(x), dim=1)


class FoldEnsemble(nn.Module):
    """The K fold models as one classifier: mean of their softmax outputs, for scoring new images.

    Input: uint8 (B, H, W, C); output: class probabilities (B, K).
    """

    def __init__(self, models: list[SmallCNN]):
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_float(images)
        return torch.stack([m(x).softmax(dim=1) for m in self.members]).mean(dim=0)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Mean of the members' embeddings, L2-normalised: (B, 128) for uint8 (B, H, W, C)."""
        x = to_float(images)
        return F.normalize(torch.stack([m.embed(x) for m in self.members]).mean(dim=0), dim=1)


def member_for_content(content_keys: np.ndarray, folds: int) -> np.ndarray:
    """(N,) fold model that scores each new image, a function of its content key (N,) str (sha256 hex)."""
    return np.array([int(key[:15], 16) % folds for key in content_keys], dtype=np.int64)


@torch.no_grad()
def score_out_of_sample(ensemble: FoldEnsemble, images: np.ndarray, member: np.ndarray,
                        batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (N, K) and embeddings (N, D) of uint8 ``images`` (N, H, W, C), each image scored by
    one fold model, ``member`` (N,).

    An out-of-fold prediction comes from one fold model; the mean of all K is sharper and more
    accurate. Scoring a later image with one fold model gives it a prediction distributed like the
    out-of-fold ones the noise model was calibrated on, so a vendor's rate does not depend on whether
    its images arrived before or after training.
    """
    k = len(ensemble.members)
    n_classes = ensemble.members[0].classifier.out_features
    probs = np.zeros((len(images), n_classes))
    embeddings = np.zeros((len(images), ensemble.members[0].project[0].out_features), np.float32)
    for m in range(k):
        chosen = np.flatnonzero(member == m)
        if len(chosen):
            x = torch.from_numpy(np.ascontiguousarray(images[chosen]))
            probs[chosen], embeddings[chosen] = predict(ensemble.members[m], torch.device("cpu"), x, batch_size)
    return probs, embeddings


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1]."""
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image of (B, C, H, W) by up to ``max_shift`` pixels (zero fill), vectorised."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=generator).float()
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = shifts[:, 0] * 2.0 / w
    theta[:, 1, 2] = shifts[:, 1] * 2.0 / h
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def train(model: nn.Module, device: torch.device, images: torch.Tensor, labels: torch.Tensor,
          optimizer: torch.optim.Optimizer, scheduler, epoch: int, config: TrainConfig,
          generator: torch.Generator) -> float:
    """One epoch over uint8 ``images`` (N, H, W, C) with int64 ``labels`` (N,); returns the mean loss."""
    model.train()
    order = torch.randperm(len(labels), generator=generator)
    total, seen = 0.0, 0
    for start in range(0, len(order), config.batch_size):
        index = order[start:start + config.batch_size]
        if len(index) < 2:  # batch norm needs two samples
            continue
        x = random_shift(to_float(images[index]), config.augment_shift, generator).to(device)
        y = labels[index].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        total += loss.item() * len(index)
        seen += len(index)
    return total / max(seen, 1)


@torch.no_grad()
def predict(model: nn.Module, device: torch.device, images: torch.Tensor,
            batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, K) and L2-normalised embeddings (N, D) for uint8 ``images`` (N, H, W, C)."""
    model.eval()
    probs, embeds = [], []
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size]).to(device)
        probs.append(model(x).softmax(dim=1).cpu())
        embeds.append(model.embed(x).cpu())
    return torch.cat(probs).numpy().astype(np.float64), torch.cat(embeds).numpy()


def fit(images: torch.Tensor, labels: torch.Tensor, n_classes: int, config: TrainConfig, device: torch.device,
        seed: int, on_epoch: EpochCallback | None = None, fold: int | None = None) -> SmallCNN:
    """Train a fresh SmallCNN on uint8 ``images`` (N, H, W, C) and ``labels`` (N,)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = SmallCNN(images.shape[-1], n_classes, config.head, config.l2_scale).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(labels) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate, total_steps=steps)
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        loss = train(model, device, images, labels, optimizer, scheduler, epoch, config, generator)
        seconds = time.perf_counter() - started
        log.info("head=%s fold=%s epoch %d/%d loss %.4f (%.0f images/s)", config.head, fold, epoch,
                 config.epochs, loss, len(labels) / max(seconds, 1e-9))
        if on_epoch:
            on_epoch({"fold": fold, "epoch": epoch, "train_loss": loss})
    recalibrate_batchnorm(model, device, images, config.batch_size * 4)
    return model


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, device: torch.device, images: torch.Tensor, batch_size: int) -> None:
    """Recompute batch-norm running statistics with the final weights (one pass, no augmentation).

    The running averages lag behind the weights on short trainings, which ruins eval-mode predictions.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over this pass
    model.train()
    for start in range(0, len(images), batch_size):
        if len(images) - start >= 2:
            model(to_float(images[start:start + batch_size]).to(device))
    for m in norms:
        m.momentum = 0.1
    model.eval()


@dataclass
class CrossValResult:
    """Out-of-fold outputs for N images: ``probs`` (N, K), ``embeddings`` (N, D), ``fold`` (N,),
    per-fold held-out accuracy against the given labels, and the trained fold models."""

    probs: np.ndarray
    embeddings: np.ndarray
    fold: np.ndarray
    fold_accuracy: list[float]
    models: list[SmallCNN] = field(repr=False)

    def accuracy(self, labels: np.ndarray) -> float:
        return float((self.probs.argmax(axis=1) == labels).mean())


def cross_validate(images: np.ndarray, labels: np.ndarray, n_classes: int, config: TrainConfig,
                   device: torch.device | None = None, on_epoch: EpochCallback | None = None) -> CrossValResult:
    """K-fold cross-validation (stratified on the given labels) over uint8 ``images`` (N, H, W, C)."""
    device = device or pick_device()
    n = len(labels)
    splitter = StratifiedKFold(n_splits=config.folds, shuffle=True, random_state=config.seed)
    fold_of = np.zeros(n, dtype=np.int64)
    probs = np.zeros((n, n_classes))
    embeddings = np.zeros((n, 128), dtype=np.float32)
    accuracy, models = [], []
    x_all = torch.from_numpy(np.ascontiguousarray(images))
    y_all = torch.from_numpy(labels.astype(np.int64))
    min_count = np.bincount(labels, minlength=n_classes)
    splits = splitter.split(np.zeros(n), labels) if min_count[min_count > 0].min() >= config.folds else \
        _plain_kfold(n, config.folds, config.seed)
    for fold, (train_idx, test_idx) in enumerate(splits):
        log.info("head=%s fold %d/%d: training on %d images, holding out %d", config.head, fold + 1,
                 config.folds, len(train_idx), len(test_idx))
        model = fit(x_all[train_idx], y_all[train_idx], n_classes, config, device,
                    seed=config.seed * 1000 + fold, on_epoch=on_epoch, fold=fold)
        p, e = predict(model, device, x_all[test_idx])
        probs[test_idx], embeddings[test_idx], fold_of[test_idx] = p, e, fold
        accuracy.append(float((p.argmax(axis=1) == labels[test_idx]).mean()))
        log.info("head=%s fold %d/%d: held-out accuracy %.4f", config.head, fold + 1, config.folds, accuracy[-1])
        models.append(model.cpu())
    return CrossValResult(probs, embeddings, fold_of, accuracy, models)


def _plain_kfold(n: int, folds: int, seed: int):
    from sklearn.model_selection import KFold

    return KFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(n))
