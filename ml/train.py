"""K-fold cross-validated classifiers: every image gets out-of-fold class probabilities and an
embedding from a model that never saw it.

Three ways to train (``TrainConfig.training``):

- ``scratch``: the small CNN (``small_cnn``) trained end to end from random weights (small grayscale
  images);
- ``probe``: a pretrained backbone's frozen features, computed once per image and cached
  (:mod:`ml.features`), and a small head per fold trained on them: seconds on a CPU;
- ``finetune``: the pretrained backbone and head trained end to end per fold, with
  ``torchvision.transforms.v2`` augmentation and mixed precision on CUDA.

Two heads: ``softmax`` (a plain linear classifier) and ``l2softmax`` (features L2-normalised and
scaled before a bias-free classifier, Ranjan et al. 2017), which gives an embedding made for
nearest-neighbour comparisons.
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch import nn

from ml.engine import RAY, Engine
from ml.image_stack import read_rows

log = logging.getLogger(__name__)

# called after each epoch with {"fold": 1..K, "epoch": 1..E, "train_loss": ...}: folds count from 1 everywhere
EpochCallback = Callable[[dict], None]


SCRATCH, PROBE, FINETUNE = "scratch", "probe", "finetune"
TRAINING_MODES = (PROBE, FINETUNE)
FLOAT32, BFLOAT16 = "float32", "bfloat16"
PRECISIONS = (FLOAT32, BFLOAT16)


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
    backbone: str = "small_cnn"   # resolved (never auto): ml.backbones.choose_backbone
    weights: str = "none"         # the weights setting of the backbone
    training: str = SCRATCH       # scratch, probe or finetune (resolved: resolve_training)
    # probe heads (measured on CIFAR-10 features with noisy labels; see README "Photos and backbones")
    probe_epochs: int = 60        # at most; early stopping on an inner split of the fold's training images
    probe_patience: int = 6
    probe_loss: str = "ce"        # ce (cross-entropy with label smoothing) or gce (generalized CE)
    label_smoothing: float = 0.1
    gce_q: float = 0.7
    probe_dropout: float = 0.2
    probe_weight_decay: float = 1e-3
    probe_learning_rate: float = 2e-3
    probe_batch_size: int = 512
    precision: str = "float32"    # of scratch and fine-tune training steps (resolved, never auto): resolve_precision
    engine: str = "local"         # where backbone features are computed: local or ray (ml.features)
    ray_address: str = ""         # engine ray: the cluster; empty: a local Ray for the call


def pick_device() -> torch.device:
    """CUDA when present, else the CPU (with all its cores)."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


class _HeadOutputs(nn.Module):
    """The two heads on a model's 128-d ``features_of`` its input: ``forward`` returns logits (B, K),
    through the L2-normalised, scaled embedding for ``l2softmax``; ``embed`` the L2-normalised
    embedding (B, 128). Subclasses set ``head``, ``l2_scale``, ``classifier`` and ``features_of``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features_of(x)
        if self.head == "l2softmax":
            z = self.l2_scale * F.normalize(z, dim=1)
        return self.classifier(z)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features_of(x), dim=1)


class SmallCNN(_HeadOutputs):
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
def score_out_of_sample(ensemble: nn.Module, images: np.ndarray, member: np.ndarray,
                        batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (N, K) and embeddings (N, D) of uint8 ``images`` (N, H, W, C), each image scored by
    one fold model, ``member`` (N,).

    An out-of-fold prediction comes from one fold model; the mean of all K is sharper and more
    accurate. Scoring a later image with one fold model gives it a prediction distributed like the
    out-of-fold ones the noise model was calibrated on, so a vendor's rate does not depend on whether
    its images arrived before or after training. Works for the small-CNN, probe and fine-tuned
    ensembles; a probe ensemble computes (or reads from its cache) each image's features once.
    """
    k = len(ensemble.members)
    n_classes = ensemble.members[0].classifier.out_features
    probs = np.zeros((len(images), n_classes))
    embeddings = np.zeros((len(images), 128), np.float32)
    features = None
    if isinstance(ensemble, ProbeEnsemble) and len(images):
        features = torch.from_numpy(ensemble.features(images))
    for m in range(k):
        chosen = np.flatnonzero(member == m)
        if not len(chosen):
            continue
        if features is not None:
            probs[chosen], embeddings[chosen] = predict_features(ensemble.members[m], features[chosen])
            continue
        if isinstance(ensemble, FinetuneEnsemble):
            probs[chosen], embeddings[chosen] = predict_images(ensemble.members[m], torch.device("cpu"), images,
                                                               batch_size, rows=chosen)
        else:
            x = torch.from_numpy(np.ascontiguousarray(images[chosen]))
            probs[chosen], embeddings[chosen] = predict(ensemble.members[m], torch.device("cpu"), x, batch_size)
    return probs, embeddings


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1], channels-last in memory (a permuted view keeps
    the pixel order, so no copy but the conversion)."""
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
        # channels-last: the layout oneDNN's CPU convolutions are fastest in (measured 1.47x on 2 cores)
        x = random_shift(to_float(images[index]), config.augment_shift, generator).to(device).contiguous(
            memory_format=torch.channels_last)
        y = labels[index].to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == BFLOAT16):
            loss = F.cross_entropy(model(x).float(), y)
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
    model = SmallCNN(images.shape[-1], n_classes, config.head, config.l2_scale).to(device).to(
        memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = config.epochs * math.ceil(len(labels) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate, total_steps=steps)
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        loss = train(model, device, images, labels, optimizer, scheduler, epoch, config, generator)
        seconds = time.perf_counter() - started
        log.info("head=%s fold %s/%d epoch %d/%d loss %.4f (%.0f images/s)", config.head, fold, config.folds, epoch,
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
    per-fold held-out accuracy against the given labels, and the trained fold models.

    ``ensemble`` scores later images (:func:`score_out_of_sample`); ``stats`` holds plain facts for
    MLflow: training mode, device, throughput (images/s), peak memory (MB), seconds.
    """

    probs: np.ndarray
    embeddings: np.ndarray
    fold: np.ndarray
    fold_accuracy: list[float]
    models: list[nn.Module] = field(repr=False)
    ensemble: nn.Module | None = field(default=None, repr=False)
    stats: dict = field(default_factory=dict)

    def accuracy(self, labels: np.ndarray) -> float:
        return float((self.probs.argmax(axis=1) == labels).mean())


def fold_splits(labels: np.ndarray, n_classes: int, folds: int, seed: int):
    """(train, test) index pairs, stratified on the given labels when every class has ``folds`` images."""
    n = len(labels)
    min_count = np.bincount(labels, minlength=n_classes)
    if min_count[min_count > 0].min() >= folds:
        return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(n), labels))
    return list(_plain_kfold(n, folds, seed))


# trains fold ``fold`` (0-based) on rows ``train_idx`` and returns its model with the held-out rows' (probs,
# embeddings)
FoldTrainer = Callable[[int, np.ndarray, np.ndarray], tuple[nn.Module, tuple[np.ndarray, np.ndarray]]]


def _out_of_fold(labels: np.ndarray, n_classes: int, config: TrainConfig, train_fold: FoldTrainer,
                 kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float], list[nn.Module]]:
    """The K-fold loop every training mode shares: ``train_fold`` per fold of :func:`fold_splits`, its
    held-out outputs gathered into (N, K) probs and (N, 128) embeddings, its accuracy on the given labels
    logged (``kind``: how the fold was trained, for the log). Returns probs, embeddings, fold per image,
    per-fold accuracy and the fold models."""
    n = len(labels)
    fold_of = np.zeros(n, dtype=np.int64)
    probs, embeddings = np.zeros((n, n_classes)), np.zeros((n, 128), np.float32)
    accuracy, models = [], []
    for fold, (train_idx, test_idx) in enumerate(fold_splits(labels, n_classes, config.folds, config.seed)):
        log.info("head=%s fold %d/%d: training on %d images, holding out %d", config.head, fold + 1,
                 config.folds, len(train_idx), len(test_idx))
        model, (probs[test_idx], embeddings[test_idx]) = train_fold(fold, train_idx, test_idx)
        fold_of[test_idx] = fold
        accuracy.append(float((probs[test_idx].argmax(axis=1) == labels[test_idx]).mean()))
        log.info("head=%s fold %d/%d: held-out accuracy %.4f (%s)", config.head, fold + 1, config.folds,
                 accuracy[-1], kind)
        models.append(model)
    return probs, embeddings, fold_of, accuracy, models


def cross_validate(images: np.ndarray, labels: np.ndarray, n_classes: int, config: TrainConfig,
                   device: torch.device | None = None, on_epoch: EpochCallback | None = None) -> CrossValResult:
    """K-fold cross-validation (stratified on the given labels) of the small CNN over uint8 ``images``
    (N, H, W, C), trained from scratch."""
    device = device or pick_device()
    x_all = torch.from_numpy(np.ascontiguousarray(images))
    y_all = torch.from_numpy(labels.astype(np.int64))
    meter = _Meter(device)

    def train_fold(fold: int, train_idx: np.ndarray, test_idx: np.ndarray):
        with meter.count(len(train_idx) * config.epochs):
            model = fit(x_all[train_idx], y_all[train_idx], n_classes, config, device,
                        seed=config.seed * 1000 + fold, on_epoch=on_epoch, fold=fold + 1)
        outputs = predict(model, device, x_all[test_idx])
        return model.cpu(), outputs

    *outputs, models = _out_of_fold(labels, n_classes, config, train_fold, "from scratch")
    return CrossValResult(*outputs, models, FoldEnsemble(models).eval(), meter.stats(SCRATCH))


def _plain_kfold(n: int, folds: int, seed: int):
    from sklearn.model_selection import KFold

    return KFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(n))


# ---- measuring ---------------------------------------------------------------------------------


class _Meter:
    """Training throughput (images/s over the timed sections) and peak memory of one cross-validation."""

    def __init__(self, device: torch.device):
        self.device, self.images, self.seconds, self.started = device, 0, 0.0, time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @contextmanager
    def count(self, images: int):
        """Time the enclosed training of ``images`` images (counting every epoch)."""
        started = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - started
        self.images += images

    def stats(self, mode: str, **extra) -> dict:
        return {"training": mode, "device": self.device.type,
                "train_images_per_s": round(self.images / max(self.seconds, 1e-9), 1),
                "peak_memory_mb": round(peak_memory_mb(self.device), 1),
                "train_seconds": round(time.perf_counter() - self.started, 2), **extra}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory on a GPU, else the resident set size (MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


def resolve_heads(heads: tuple[str, ...] | str, mode: str) -> tuple[tuple[str, ...], str]:
    """(heads, reason): ``auto`` is the L2-softmax head alone for the small CNN from scratch and the
    softmax head alone on pretrained features, the head whose probabilities rate vendors better in each
    case (README, Heads). Training both and keeping the more accurate one cost twice the training and
    rated worse: the two heads' held-out accuracies are within half a point, so the choice between them
    is close to a coin toss (Fashion-MNIST scenario A, 10 seeds: MAE 0.71 points against 0.66 for
    L2-softmax alone); on CIFAR-10 photos the L2-softmax head's probabilities read every vendor 1-3
    points higher at the same accuracy, which an accuracy-based choice cannot see."""
    if heads != "auto":
        return tuple(heads), "set in the settings"
    if mode == SCRATCH:
        return ("l2softmax",), "auto from scratch: the L2-softmax head (its probabilities rate vendors better)"
    return ("softmax",), f"auto with {mode}: the softmax head (its probabilities rate photo vendors better)"


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(precision, reason) of the training steps: ``auto`` is ``bfloat16`` (autocast, weights and
    optimizer kept in float32) on CUDA and on CPUs that compute bfloat16 natively (AVX512-BF16 or
    AMX), where it trains the small CNN about twice as fast at the same accuracy (README, Measured);
    ``float32`` on other CPUs, which have no bfloat16 arithmetic to gain from. Predictions are float32."""
    if precision in PRECISIONS:
        return precision, "set in the settings"
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}: float32, bfloat16 or auto")
    if device.type == "cuda":
        return BFLOAT16, "auto on a GPU"
    if _cpu_has_native_bfloat16():
        return BFLOAT16, "auto: this CPU computes bfloat16 natively"
    return FLOAT32, "auto: this CPU has no native bfloat16"


def _cpu_has_native_bfloat16() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's query: assume emulation
        return False


def resolve_training(training: str, backbone: str, device: torch.device) -> tuple[str, str]:
    """(mode, reason): ``auto`` is ``finetune`` on CUDA and ``probe`` on a CPU; ``small_cnn`` has no
    pretrained features and is always trained from scratch."""
    if backbone == "small_cnn":
        return SCRATCH, "small_cnn is trained from scratch, end to end"
    if training == "auto":
        if device.type == "cuda":
            return FINETUNE, "auto on a GPU: fine-tune the pretrained backbone end to end"
        return PROBE, f"auto on {device.type}: frozen features and a trained head (fine-tuning needs a GPU)"
    if training not in TRAINING_MODES:
        raise ValueError(f"unknown training {training!r}: probe, finetune or auto")
    return training, "set in the settings"


# ---- heads on features -------------------------------------------------------------------------


class FeatureHead(_HeadOutputs):
    """A classifier head on backbone features (B, D): optional standardisation (buffers fitted on
    the fold's training images only), dropout, a 128-d projection and the head's classifier.

    ``forward`` -> logits (B, K); ``embed`` -> L2-normalised 128-d embeddings (B, 128). ``l2softmax``
    scales the normalised projection by ``l2_scale`` before a bias-free classifier.
    """

    def __init__(self, feature_dim: int, n_classes: int, head: str = "softmax", l2_scale: float = 16.0,
                 dropout: float = 0.2, embed_dim: int = 128):
        super().__init__()
        if head not in ("softmax", "l2softmax"):
            raise ValueError(f"unknown head {head!r}")
        self.head = head
        self.l2_scale = l2_scale
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("scale", torch.ones(feature_dim))
        self.dropout = nn.Dropout(dropout)
        self.project = nn.Sequential(nn.Linear(feature_dim, embed_dim), nn.BatchNorm1d(embed_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Linear(embed_dim, n_classes, bias=(head == "softmax"))

    def fit_standardisation(self, features: torch.Tensor) -> None:
        """Standardise with the mean and spread of ``features`` (N, D): the fold's training images."""
        self.mean.copy_(features.mean(dim=0))
        spread = features.std(dim=0) if len(features) > 1 else torch.ones(features.shape[1])
        # a feature (nearly) constant on few training images must not blow up on a held-out one
        self.scale.copy_(spread.clamp_min(max(0.1 * float(spread.mean()), 1e-6)))

    def features_of(self, features: torch.Tensor) -> torch.Tensor:
        return self.project(self.dropout((features - self.mean) / self.scale))


def generalized_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, q: float) -> torch.Tensor:
    """(1 - p_y^q) / q, mean over the batch (Zhang & Sabuncu 2018): between cross-entropy (q -> 0)
    and the mean absolute error (q = 1), which a wrong label pulls on less."""
    p = logits.softmax(dim=1).gather(1, labels[:, None]).squeeze(1).clamp_min(1e-7)
    return ((1 - p.pow(q)) / q).mean()


def _probe_loss(logits: torch.Tensor, labels: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    if config.probe_loss == "gce":
        return generalized_cross_entropy(logits, labels, config.gce_q)
    return F.cross_entropy(logits, labels, label_smoothing=config.label_smoothing)


def fit_head(features: torch.Tensor, labels: torch.Tensor, n_classes: int, config: TrainConfig,
             seed: int, on_epoch: EpochCallback | None = None, fold: int | None = None) -> FeatureHead:
    """Train a FeatureHead on ``features`` (N, D) float and ``labels`` (N,) int64.

    A tenth of the images (stratified by label) is held back to stop early: training ends when their
    loss has not improved for ``probe_patience`` epochs, and the best epoch's weights are kept. The
    labels are noisy, so the loss on held-back noisy labels, not training loss, says when the head
    starts memorising wrong labels.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    inner_train, inner_val = _inner_split(labels.numpy(), seed)
    head = FeatureHead(features.shape[1], n_classes, config.head, config.l2_scale, config.probe_dropout)
    head.fit_standardisation(features)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.probe_learning_rate,
                                  weight_decay=config.probe_weight_decay)
    x_train, y_train = features[inner_train], labels[inner_train]
    x_val, y_val = features[inner_val], labels[inner_val]
    best, best_state, waited = math.inf, None, 0
    batch = min(config.probe_batch_size, len(y_train))
    for epoch in range(1, config.probe_epochs + 1):
        head.train()
        order = torch.randperm(len(y_train), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch):
            index = order[start:start + batch]
            if len(index) < 2:
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = _probe_loss(head(x_train[index]), y_train[index], config)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        head.eval()
        with torch.no_grad():
            val_loss = F.cross_entropy(head(x_val), y_val).item() if len(y_val) else total
        if on_epoch:
            on_epoch({"fold": fold, "epoch": epoch, "train_loss": total / max(len(y_train), 1), "val_loss": val_loss})
        if val_loss < best - 1e-4:
            best, waited = val_loss, 0
            best_state = {k: v.clone() for k, v in head.state_dict().items()}
        else:
            waited += 1
            if waited >= config.probe_patience:
                break
    if best_state is not None:
        head.load_state_dict(best_state)
    head.epochs_run = epoch
    log.info("head=%s fold %s/%d: probe stopped after %d epochs (held-back loss %.4f)", config.head, fold, config.folds,
             epoch, best)
    return head.eval()


def _inner_split(labels: np.ndarray, seed: int, share: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices inside a fold's training images, stratified where classes allow."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        take = int(round(share * len(members))) if len(members) >= 5 else 0
        val.extend(members[:take])
    val = np.sort(np.array(val, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val


@torch.no_grad()
def predict_features(head: FeatureHead, features: torch.Tensor, batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (N, K) float64 and embeddings (N, 128) float32 of ``features`` (N, D)."""
    head.eval()
    probs, embeds = [], []
    for start in range(0, len(features), batch_size):
        x = features[start:start + batch_size]
        probs.append(head(x).softmax(dim=1))
        embeds.append(head.embed(x))
    return torch.cat(probs).numpy().astype(np.float64), torch.cat(embeds).numpy()


@dataclass
class FittedFold:
    """One fold's probe head, its held-out ``probs`` (M, K) and ``embeddings`` (M, 128), and the seconds
    its training took."""

    head: FeatureHead
    probs: np.ndarray
    embeddings: np.ndarray
    seconds: float


def fit_fold_head(features: torch.Tensor, labels: torch.Tensor, train_idx: np.ndarray, test_idx: np.ndarray,
                  n_classes: int, config: TrainConfig, fold: int, on_epoch: EpochCallback | None = None) -> FittedFold:
    """Fold ``fold``'s (from 0) head on the rows ``train_idx`` of ``features`` (N, D) and ``labels`` (N,),
    scored on the rows ``test_idx``; on one torch thread, so a fold gives the same floats in this process
    and in a Ray task (:mod:`ml.ray_training`)."""
    with _one_thread():
        started = time.perf_counter()
        head = fit_head(features[train_idx], labels[train_idx], n_classes, config, config.seed * 1000 + fold,
                        on_epoch, fold + 1)
        seconds = time.perf_counter() - started
        probs, embeddings = predict_features(head, features[test_idx])
    return FittedFold(head, probs, embeddings, seconds)


def cross_validate_probe(features: np.ndarray, labels: np.ndarray, n_classes: int, config: TrainConfig,
                         on_epoch: EpochCallback | None = None) -> CrossValResult:
    """K-fold heads on frozen features (N, D): each fold's head, including its standardisation and
    its early stopping, sees only that fold's training images. Runs on the CPU (seconds), fold after
    fold; with ``config.engine`` ray, one Ray task per fold (:mod:`ml.ray_training`), which gives the
    same heads. Ray must then be initialised (:func:`ml.ray_features.ray_session`)."""
    x_all = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y_all = torch.from_numpy(labels.astype(np.int64))
    meter = _Meter(torch.device("cpu"))
    on_ray = None
    if config.engine == RAY:
        from ml.ray_training import fit_fold_heads_on_ray

        on_ray = fit_fold_heads_on_ray(x_all.numpy(), labels, fold_splits(labels, n_classes, config.folds, config.seed),
                                       n_classes, config)

    def train_fold(fold: int, train_idx: np.ndarray, test_idx: np.ndarray):
        if on_ray is None:
            fitted = fit_fold_head(x_all, y_all, train_idx, test_idx, n_classes, config, fold, on_epoch)
        else:
            fitted, epochs = on_ray[fold]
            for epoch in epochs if on_epoch else ():
                on_epoch(epoch)
        meter.seconds += fitted.seconds
        meter.images += len(train_idx) * fitted.head.epochs_run  # images through the head, epoch after epoch
        return fitted.head, (fitted.probs, fitted.embeddings)

    *outputs, heads = _out_of_fold(labels, n_classes, config, train_fold, "probe" if on_ray is None else "probe on Ray")
    return CrossValResult(*outputs, heads, None, meter.stats(PROBE))


@contextmanager
def _one_thread():
    """Run a small head's training on one thread: its operations are too small to share, and on a busy
    machine two threads waiting on each other made a fold 8x slower (2.2 s against 17 s, measured here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ProbeEnsemble(nn.Module):
    """A frozen backbone and the K fold heads trained on its features.

    ``forward``: uint8 (B, H, W, C) -> mean class probabilities (B, K) (for the model registry);
    scoring uses one head per image (:func:`score_out_of_sample`). ``feature_cache``: a folder for
    :func:`ml.features.extract_features` (None: features are not cached); ``engine``
    (:class:`ml.engine.Engine`, default local): where the features of images scored later are computed.
    """

    def __init__(self, backbone, heads: list[FeatureHead], feature_cache: Path | None = None,
                 engine: Engine = Engine()):
        super().__init__()
        self.backbone = backbone
        self.members = nn.ModuleList(heads)
        self.feature_cache = feature_cache
        self.engine = engine

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(self.backbone.prepare(images))
        return torch.stack([m(features).softmax(dim=1) for m in self.members]).mean(dim=0)

    def features(self, images: np.ndarray) -> np.ndarray:
        from ml.features import extract_features

        return extract_features(self.backbone, images, self.feature_cache, pick_device(), engine=self.engine)[0]


# ---- fine-tuning -------------------------------------------------------------------------------


class FinetunedNet(nn.Module):
    """A backbone and a FeatureHead trained together: float (B, 3, S, S) normalised -> logits (B, K)."""

    def __init__(self, backbone, head: FeatureHead):
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def classifier(self) -> nn.Linear:
        return self.head.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.embed(self.backbone(x))


class FinetuneEnsemble(nn.Module):
    """The K fine-tuned fold models: uint8 (B, H, W, C) -> mean class probabilities (B, K)."""

    def __init__(self, members: list[FinetunedNet]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.members[0].backbone.prepare(images)
        return torch.stack([m(x).softmax(dim=1) for m in self.members]).mean(dim=0)


def _augment(images: torch.Tensor) -> torch.Tensor:
    """Random resized crop (60-100% of the area) and horizontal flip of each uint8 image (B, H, W, C),
    at its own size, with torchvision.transforms.v2 (each image its own draw)."""
    from torchvision.transforms import v2

    side = images.shape[1]
    transform = v2.Compose([v2.RandomResizedCrop(side, scale=(0.6, 1.0), antialias=True), v2.RandomHorizontalFlip()])
    chw = images.permute(0, 3, 1, 2)
    return torch.stack([transform(image) for image in chw]).permute(0, 2, 3, 1)


def fit_finetune(backbone_factory: Callable[[], nn.Module], images, rows: np.ndarray, labels: torch.Tensor,
                 n_classes: int, config: TrainConfig, device: torch.device, seed: int,
                 on_epoch: EpochCallback | None = None, fold: int | None = None) -> FinetunedNet:
    """Train a fresh pretrained backbone and head end to end on uint8 ``images`` (N, H, W[, C]; an array
    or a memory-mapped ImageStack) at ``rows`` (M,), whose labels are ``labels`` (M,); each batch is
    read when its turn comes.

    The backbone learns at a tenth of the head's rate (its features are already good); the steps run in
    ``config.precision`` (bfloat16 autocast or float32).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    backbone = backbone_factory()
    head = FeatureHead(backbone.feature_dim, n_classes, config.head, config.l2_scale, dropout=0.2)
    model = FinetunedNet(backbone, head).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([
        {"params": backbone.parameters(), "lr": config.learning_rate / 10},
        {"params": head.parameters(), "lr": config.learning_rate},
    ], weight_decay=config.weight_decay)
    steps = config.epochs * max(1, math.ceil(len(labels) / config.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[config.learning_rate / 10, config.learning_rate], total_steps=steps)
    use_autocast = config.precision == BFLOAT16
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(rows), generator=generator)
        total, seen, started = 0.0, 0, time.perf_counter()
        for start in range(0, len(order), config.batch_size):
            index = order[start:start + config.batch_size]
            if len(index) < 2:  # batch norm needs two samples
                continue
            batch = _augment(torch.from_numpy(read_rows(images, rows[index.numpy()]))).to(device, non_blocking=True)
            y = labels[index].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                x = backbone.prepare(batch).contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(model(x).float(), y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler.last_epoch + 1 < steps:
                scheduler.step()
            total += loss.item() * len(index)
            seen += len(index)
        log.info("head=%s fold %s/%d fine-tune epoch %d/%d loss %.4f (%.0f images/s on %s)", config.head, fold,
                 config.folds, epoch, config.epochs, total / max(seen, 1),
                 seen / max(time.perf_counter() - started, 1e-9), device.type)
        if on_epoch:
            on_epoch({"fold": fold, "epoch": epoch, "train_loss": total / max(seen, 1)})
    return model.eval()


@torch.no_grad()
def predict_images(model: FinetunedNet, device: torch.device, images, batch_size: int = 256,
                   rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (M, K) and embeddings (M, 128) by a fine-tuned model of uint8 ``images`` (N, H, W[, C];
    an array or an ImageStack) at ``rows`` (M,; None: all), read batch by batch."""
    model.eval()
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    probs, embeds = [], []
    for start in range(0, len(rows), batch_size):
        batch = torch.from_numpy(read_rows(images, rows[start:start + batch_size])).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            x = model.backbone.prepare(batch).contiguous(memory_format=torch.channels_last)
            features = model.backbone(x).float()
        probs.append(model.head(features).softmax(dim=1).cpu())
        embeds.append(model.head.embed(features).cpu())
    return torch.cat(probs).numpy().astype(np.float64), torch.cat(embeds).numpy()


def cross_validate_finetune(images, labels: np.ndarray, n_classes: int, config: TrainConfig,
                            backbone_factory: Callable[[], nn.Module], device: torch.device | None = None,
                            on_epoch: EpochCallback | None = None) -> CrossValResult:
    """K-fold fine-tuning of a pretrained backbone over uint8 ``images`` (N, H, W[, C]; an array or a
    memory-mapped ImageStack, read batch by batch)."""
    device = device or pick_device()
    y_all = torch.from_numpy(labels.astype(np.int64))
    meter = _Meter(device)

    def train_fold(fold: int, train_idx: np.ndarray, test_idx: np.ndarray):
        with meter.count(len(train_idx) * config.epochs):
            model = fit_finetune(backbone_factory, images, train_idx, y_all[train_idx], n_classes, config, device,
                                 config.seed * 1000 + fold, on_epoch, fold + 1)
        outputs = predict_images(model, device, images, rows=test_idx)
        return model.cpu(), outputs

    *outputs, models = _out_of_fold(labels, n_classes, config, train_fold, "fine-tuned")
    return CrossValResult(*outputs, models, FinetuneEnsemble(models).eval(), meter.stats(FINETUNE))


# ---- one entry point -----------------------------------------------------------------------------


def train_folds(images: np.ndarray, labels: np.ndarray, n_classes: int, config: TrainConfig,
                device: torch.device | None = None, on_epoch: EpochCallback | None = None,
                feature_cache: Path | None = None, backbone=None) -> CrossValResult:
    """Cross-validate as ``config.training`` says (scratch, probe or finetune) over uint8 ``images``
    (N, H, W, C): an array, or a memory-mapped :class:`ml.image_stack.ImageStack`, read batch by batch
    (the probe reads only the images missing from the feature cache; scratch training reads all at once).
    ``backbone``: an already loaded :class:`ml.backbones.Backbone` (else loaded from ``config.backbone``
    / ``config.weights``). The result's ``ensemble`` scores later images."""
    from ml.backbones import describe, image_side_and_channels, load_backbone

    device = device or pick_device()
    if config.training == SCRATCH:  # small images: all in memory, as one tensor
        return cross_validate(np.asarray(images), labels, n_classes, config, device, on_epoch)
    side, _ = image_side_and_channels(images)
    if backbone is None:
        backbone = load_backbone(config.backbone, config.weights, image_side=side)
    if config.training == PROBE:
        from ml.features import extract_features

        engine = Engine(config.engine, config.ray_address)
        with _engine_session(engine):  # one Ray for the features and the fold heads
            features, feature_stats = extract_features(backbone, images, feature_cache, device, engine=engine)
            result = cross_validate_probe(features, labels, n_classes, config, on_epoch)
        result.ensemble = ProbeEnsemble(backbone.cpu(), result.models, feature_cache, engine).eval()
        result.stats.update(device=device.type, feature_engine=feature_stats.device,
                            features_computed=feature_stats.n_computed,
                            features_cached=feature_stats.n_cached,
                            feature_images_per_s=round(feature_stats.images_per_second, 1),
                            feature_seconds=round(feature_stats.seconds, 2),
                            peak_memory_mb=round(peak_memory_mb(device), 1))
    elif config.training == FINETUNE:
        name, weights, input_size = config.backbone, config.weights, backbone.input_size

        def fresh_backbone():
            fresh = load_backbone(name, weights)
            fresh.input_size = input_size
            return fresh

        result = cross_validate_finetune(images, labels, n_classes, config, fresh_backbone, device, on_epoch)
    else:
        raise ValueError(f"unknown training {config.training!r}")
    result.stats.update(describe(backbone))
    return result


@contextmanager
def _engine_session(engine):
    """Ray for the block where ``engine`` is ray (:func:`ml.ray_features.ray_session`); nothing otherwise."""
    if not engine.on_ray:
        yield
        return
    from ml.ray_features import ray_session

    with ray_session(engine.ray_address):
        yield


# ---- scoring later images and saving ensembles -----------------------------------------------------


def ensemble_payload(ensemble: nn.Module, classes: tuple[str, ...], head: str) -> dict:
    """Plain tensors and strings describing an ensemble (no pickled code), for ``torch.save``.

    A probe ensemble stores its heads and the backbone's name, weights setting, identity and input
    size, not the backbone's weights: they are rebuilt from the setting and checked against the identity.
    """
    if isinstance(ensemble, ProbeEnsemble):
        b = ensemble.backbone
        return {"kind": PROBE, "classes": list(classes), "head": head, "l2_scale": float(ensemble.members[0].l2_scale),
                "backbone": b.name, "weights": b.weights, "identity": b.identity, "input_size": int(b.input_size),
                "feature_dim": int(b.feature_dim), "members": [m.state_dict() for m in ensemble.members]}
    if isinstance(ensemble, FinetuneEnsemble):
        b = ensemble.members[0].backbone
        return {"kind": FINETUNE, "classes": list(classes), "head": head,
                "l2_scale": float(ensemble.members[0].head.l2_scale), "backbone": b.name, "weights": b.weights,
                "input_size": int(b.input_size), "feature_dim": int(b.feature_dim),
                "members": [m.state_dict() for m in ensemble.members]}
    first = ensemble.members[0]
    return {"kind": SCRATCH, "classes": list(classes), "head": head, "l2_scale": float(first.l2_scale),
            "in_channels": int(first.features[0][0].in_channels), "members": [m.state_dict() for m in ensemble.members]}


def ensemble_from_payload(payload: dict, n_classes: int, feature_cache: Path | None = None,
                          engine: Engine = Engine()) -> nn.Module:
    """The ensemble :func:`ensemble_payload` described (payloads without ``kind`` are small-CNN ones);
    ``engine`` (:class:`ml.engine.Engine`): where a probe ensemble computes features."""
    from ml.backbones import NO_WEIGHTS, load_backbone

    kind = payload.get("kind", SCRATCH)
    if kind == SCRATCH:
        members = []
        for state in payload["members"]:
            model = SmallCNN(payload["in_channels"], n_classes, payload["head"], payload["l2_scale"])
            model.load_state_dict(state)
            members.append(model.eval())
        return FoldEnsemble(members).eval()
    if kind == PROBE:
        backbone = load_backbone(payload["backbone"], payload["weights"])
        if backbone.identity != payload["identity"]:
            raise ValueError(f"the backbone's weights changed since training ({payload['identity']} then, "
                             f"{backbone.identity} now): retrain (vendor-audit run --retrain)")
        backbone.input_size = int(payload["input_size"])
        heads = []
        for state in payload["members"]:
            head = FeatureHead(int(payload["feature_dim"]), n_classes, payload["head"], payload["l2_scale"])
            head.load_state_dict(state)
            heads.append(head.eval())
        return ProbeEnsemble(backbone, heads, feature_cache, engine).eval()
    if kind == FINETUNE:
        members = []
        for state in payload["members"]:
            backbone = load_backbone(payload["backbone"], NO_WEIGHTS)  # the trained weights follow
            backbone.input_size = int(payload["input_size"])
            model = FinetunedNet(backbone, FeatureHead(int(payload["feature_dim"]), n_classes, payload["head"],
                                                       payload["l2_scale"]))
            model.load_state_dict(state)
            members.append(model.eval())
        return FinetuneEnsemble(members).eval()
    raise ValueError(f"unknown model kind {kind!r}")
