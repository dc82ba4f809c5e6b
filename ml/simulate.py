"""Simulated vendor deliveries from a real dataset, with known wrong labels (the truth) kept aside."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ml.config import CONFIG_NAME, Settings, load_settings, write_settings
from ml.datasets import ImageSet
from ml.delivery import LABELS_FILE, NAME_RE, READY_MARKER
from ml.files import atomic_write_csv

TRUTH_FILE = "truth.csv"
# Systematic confusions of scenario B (Fashion-MNIST class indices), in both directions:
# shirt <-> T-shirt/top, sneaker <-> sandal, pullover <-> coat.
FASHION_PAIRS = ((6, 0), (7, 5), (2, 4))
# CIFAR-10: cat <-> dog, automobile <-> truck, deer <-> horse, bird <-> airplane.
CIFAR10_PAIRS = ((3, 5), (1, 9), (4, 7), (2, 0))
CONFUSABLE_PAIRS = {"fashion-mnist": FASHION_PAIRS, "cifar10": CIFAR10_PAIRS}


def parse_vendor_rates(spec: str) -> dict[str, float]:
    """``"a=0.0,b=0.05"`` -> ``{"a": 0.0, "b": 0.05}`` with names and fractions validated."""
    rates = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not NAME_RE.match(name):
            raise ValueError(f"bad vendor spec {part!r}: expected name=rate with letters, digits, - or _")
        rate = float(value)
        if not 0 <= rate < 1:
            raise ValueError(f"bad vendor spec {part!r}: the rate is a fraction from 0 to 1")
        rates[name] = rate
    if not rates:
        raise ValueError("no vendors given (example: a=0.0,b=0.05,c=0.2)")
    return rates


@dataclass
class SimulatedLabels:
    """N labelled images: ``images`` uint8 (N, H, W) or (N, H, W, C); ``vendor`` (N,) index into ``vendors``;
    ``given`` (N,) the vendor's label; ``true`` (N, 2) the true class and, for composed ambiguous
    images, the second true class (-1 otherwise); ``source`` (N,) dataset index of the (first) image."""

    vendors: list[str]
    images: np.ndarray
    vendor: np.ndarray
    given: np.ndarray
    true: np.ndarray
    source: np.ndarray

    @property
    def ambiguous(self) -> np.ndarray:
        return self.true[:, 1] >= 0

    @property
    def wrong(self) -> np.ndarray:
        """(N,) bool: the given label is outside the true label set."""
        return (self.given != self.true[:, 0]) & (self.given != self.true[:, 1])


def simulate_labels(data: ImageSet, vendor_rates: dict[str, float], per_vendor: int, seed: int = 0,
                    noise: str = "uniform", ambiguous: float = 0.0) -> SimulatedLabels:
    """Draw ``per_vendor`` different images per vendor and label them with known mistakes.

    noise: ``uniform`` (a wrong label is any other class) or ``pairs`` (the dataset's confusable
    pairs, ``CONFUSABLE_PAIRS``, swapped: the vendor confuses specific classes). ``ambiguous``: the
    share of each vendor's images replaced by two images of different classes overlaid (the brighter
    pixel of two grayscale images; the mean of two colour photos, where the maximum would wash both
    out); the vendor labels one of the two (not an error).
    Exactly ``round(rate * per_vendor)`` labels per vendor are wrong, drawn among the other images.
    """
    rng = np.random.default_rng(seed)
    k = len(data.classes)
    n_needed = per_vendor * len(vendor_rates) * (2 if ambiguous else 1)
    if n_needed > len(data.labels):
        raise ValueError(f"{data.name} has {len(data.labels)} images, {n_needed} needed")
    order = rng.permutation(len(data.labels))
    chosen, partners = order[:per_vendor * len(vendor_rates)], order[per_vendor * len(vendor_rates):]
    images = data.images[chosen].copy()
    true = np.stack([data.labels[chosen], np.full(len(chosen), -1)], axis=1)
    vendor = np.repeat(np.arange(len(vendor_rates)), per_vendor)
    given = true[:, 0].copy()
    partner_pool = list(partners)
    for v, rate in enumerate(vendor_rates.values()):
        members = np.flatnonzero(vendor == v)
        n_ambiguous = int(round(ambiguous * per_vendor))
        composed = rng.choice(members, n_ambiguous, replace=False) if n_ambiguous else np.array([], int)
        for i in composed:
            while True:  # a partner image of another class
                j = partner_pool.pop()
                if data.labels[j] != true[i, 0]:
                    break
            images[i] = _overlay(images[i], data.images[j])
            true[i, 1] = data.labels[j]
            given[i] = true[i, rng.integers(0, 2)]
        plain = np.setdiff1d(members, composed)
        n_wrong = int(round(rate * per_vendor))
        if noise == "pairs":
            partner_of = {a: b for x, y in CONFUSABLE_PAIRS.get(data.name, FASHION_PAIRS) for a, b in ((x, y), (y, x))}
            eligible = plain[np.isin(true[plain, 0], list(partner_of))]
            if n_wrong > len(eligible):
                raise ValueError(f"rate {rate} needs {n_wrong} confusable images, only {len(eligible)} drawn")
            wrong = rng.choice(eligible, n_wrong, replace=False)
            given[wrong] = [partner_of[c] for c in true[wrong, 0]]
        elif noise == "uniform":
            wrong = rng.choice(plain, n_wrong, replace=False)
            given[wrong] = (true[wrong, 0] + rng.integers(1, k, n_wrong)) % k
        else:
            raise ValueError(f"unknown noise {noise!r}: uniform or pairs")
    return SimulatedLabels(list(vendor_rates), images, vendor, given, true, chosen)


@dataclass(frozen=True)
class WorkerLabels:
    """Labels several people gave the same images, aligned with an :class:`ImageSet`: ``votes`` (N, W)
    one column per worker, ``majority`` (N,) their majority vote, ``worst`` (N,) a wrong vote wherever
    one is wrong (else the majority)."""

    votes: np.ndarray
    majority: np.ndarray
    worst: np.ndarray

    @property
    def split(self) -> np.ndarray:
        """(N,) bool: the workers did not all give the same label."""
        return (self.votes != self.votes[:, :1]).any(axis=1)


# How a simulated vendor labels from real workers' votes (label_by_workers):
WORKER_SOURCES = {
    "original": "the dataset's own label (no error)",
    "majority": "the workers' majority vote",
    "worker": "one worker's vote, a different worker drawn per image",
    "worst": "a wrong vote wherever a worker was wrong",
    "split-majority": "the majority vote where the workers split, the dataset's label elsewhere",
    "split-minority": "a minority vote where the workers split, the dataset's label elsewhere",
}


def label_by_workers(data: ImageSet, workers: WorkerLabels, sources: dict[str, str], per_vendor: int,
                     seed: int = 0) -> SimulatedLabels:
    """Draw ``per_vendor`` different images per vendor, each vendor labelling them as real people did.

    ``sources`` maps each vendor to one of :data:`WORKER_SOURCES`. The truth is the dataset's label;
    where the workers split, a label that one of them gave is also true for the ``split-*`` vendors
    (a plausible second label: several people would give it), not for the others, whose error rates
    are against the dataset's labels.
    """
    unknown = sorted(set(sources.values()) - set(WORKER_SOURCES))
    if unknown:
        raise ValueError(f"unknown worker label source(s) {unknown}; choose from {sorted(WORKER_SOURCES)}")
    rng = np.random.default_rng(seed)
    n_needed = per_vendor * len(sources)
    if n_needed > len(data.labels):
        raise ValueError(f"{data.name} has {len(data.labels)} images, {n_needed} needed")
    chosen = rng.permutation(len(data.labels))[:n_needed]
    vendor = np.repeat(np.arange(len(sources)), per_vendor)
    original = data.labels[chosen]
    votes, split = workers.votes[chosen], workers.split[chosen]
    rows = np.arange(n_needed)
    one_worker = votes[rows, rng.integers(0, votes.shape[1], n_needed)]
    # a minority vote: a vote that differs from the majority, drawn among such votes
    minority_vote = np.where(votes != workers.majority[chosen, None], votes, -1)
    keys = rng.random(votes.shape) * (minority_vote >= 0)
    minority = minority_vote[rows, keys.argmax(axis=1)]
    minority = np.where(minority >= 0, minority, workers.majority[chosen])
    by_source = {"original": original, "majority": workers.majority[chosen], "worker": one_worker,
                 "worst": workers.worst[chosen],
                 "split-majority": np.where(split, workers.majority[chosen], original),
                 "split-minority": np.where(split, minority, original)}
    given = np.empty(n_needed, np.int64)
    true = np.stack([original, np.full(n_needed, -1)], axis=1)
    for v, source in enumerate(sources.values()):
        members = vendor == v
        given[members] = by_source[source][members]
        if source.startswith("split-"):
            plausible = members & split & (given != original)
            true[plausible, 1] = given[plausible]
    return SimulatedLabels(list(sources), data.images[chosen], vendor, given, true, chosen)


def copy_confident_mistakes(sim: SimulatedLabels, probs: np.ndarray, shares: dict[str, float]) -> SimulatedLabels:
    """The same images with some vendors' labels replaced by the classifier's own confident mistakes.

    A vendor that pre-labels with a model like the auditor's makes its errors exactly where the
    classifier is confidently wrong. For each vendor in ``shares``, that share of its images (the ones
    whose out-of-fold ``probs`` (N, K) are most confident in a class other than the truth) get the
    classifier's class. Out-of-fold probabilities do not depend on an image's own label, so they stay
    the classifier's outputs for the new labels.
    """
    given = sim.given.copy()
    predicted, confidence = probs.argmax(axis=1), probs.max(axis=1)
    mistaken = predicted != sim.true[:, 0]
    for name, share in shares.items():
        v = sim.vendors.index(name)
        members = np.flatnonzero((sim.vendor == v) & mistaken & (sim.given == sim.true[:, 0]))
        n_copied = int(round(share * (sim.vendor == v).sum()))
        if n_copied > len(members):
            raise ValueError(f"{name}: {n_copied} confident mistakes wanted, the classifier made {len(members)}")
        copied = members[np.argsort(-confidence[members], kind="stable")[:n_copied]]
        given[copied] = predicted[copied]
    return SimulatedLabels(sim.vendors, sim.images, sim.vendor, given, sim.true, sim.source)


def _overlay(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Two images as one in which both objects are visible."""
    if first.ndim == 3 and first.shape[-1] == 3:
        return ((first.astype(np.uint16) + second) // 2).astype(np.uint8)
    return np.maximum(first, second)


def simulate_deliveries(data: ImageSet, vendor_rates: dict[str, float], per_vendor: int, home: Path,
                        seed: int = 0, batch: str = "batch-001", noise: str = "uniform",
                        ambiguous: float = 0.0) -> pd.DataFrame:
    """Write one delivery per vendor under ``home/landing`` (PNG images, labels.csv, then _READY) and
    the truth to ``home/truth.csv`` (``image_id, true_label, true_labels, given_label, vendor``;
    ``true_labels`` is ``|``-separated for ambiguous images). Returns the truth rows written here."""
    home = Path(home)
    _ensure_settings(home, data.classes)
    sim = simulate_labels(data, vendor_rates, per_vendor, seed, noise, ambiguous)
    classes = np.array(data.classes)
    names = np.array([f"images/{i:06d}.png" for i in range(len(sim.given))])
    truth_rows = []
    for v, vendor in enumerate(sim.vendors):
        members = np.flatnonzero(sim.vendor == v)
        folder = home / "landing" / vendor / batch
        (folder / "images").mkdir(parents=True, exist_ok=True)
        for i in members:
            Image.fromarray(sim.images[i]).save(folder / names[i])
        atomic_write_csv(folder / LABELS_FILE, pd.DataFrame(
            {"image": names[members], "label": classes[sim.given[members]], "annotator": f"{vendor}-team"}))
        (folder / READY_MARKER).write_text("")
        true_sets = ["|".join(classes[[t for t in row if t >= 0]]) for row in sim.true[members]]
        truth_rows.append(pd.DataFrame({
            "image_id": [f"{vendor}/{batch}/{n}" for n in names[members]],
            "true_label": classes[sim.true[members, 0]],
            "true_labels": true_sets,
            "given_label": classes[sim.given[members]],
            "vendor": vendor,
        }))
    truth = pd.concat(truth_rows, ignore_index=True)
    truth_path = home / TRUTH_FILE
    if truth_path.is_file():
        old = pd.read_csv(truth_path, dtype=str, keep_default_na=False)
        truth = pd.concat([old[~old["image_id"].isin(truth["image_id"])], truth], ignore_index=True)
    atomic_write_csv(truth_path, truth)
    return truth


def _ensure_settings(home: Path, classes: tuple[str, ...]) -> None:
    if not (home / CONFIG_NAME).is_file():
        write_settings(home, Settings(classes=classes))
        return
    settings = load_settings(home)
    if settings.classes != classes:
        raise ValueError(f"{home / CONFIG_NAME}: its classes {list(settings.classes)} differ from the "
                         f"simulated dataset's {list(classes)}; use another --home")
