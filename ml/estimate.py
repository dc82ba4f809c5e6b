"""Per-vendor noise models fitted jointly with a classifier's out-of-fold probabilities.

Each vendor ``v`` is a Dawid-Skene annotator with a confusion matrix ``C_v[true, given]``. The
classifier was trained on the vendors' noisy labels, so its calibrated probabilities estimate
``P(given | x) = P(true | x) @ T`` with ``T`` the image-weighted mean of the vendors' matrices; the
clean class prior is recovered as ``P(given | x) @ inv(T)``. EM alternates between the posterior of
each image's true class and the vendors' matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

EPS = 1e-6


@dataclass
class NoiseModel:
    """``posterior`` (N, K): P(true class | image, given label, vendor); ``clean_prior`` (N, K):
    P(true class | image); ``confusion`` (V, K, K): row-normalised per-vendor ``C[true, given]``;
    ``temperature``: the calibration applied to the classifier's logits."""

    posterior: np.ndarray
    clean_prior: np.ndarray
    confusion: np.ndarray
    temperature: float
    iterations: int

    def p_error(self, given: np.ndarray) -> np.ndarray:
        """(N,) probability that the given label is not the true class."""
        return 1.0 - self.posterior[np.arange(len(given)), given]


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the NLL of ``labels`` (N,) under softmax(log(probs)/T), probs (N, K)."""
    logits = np.log(np.clip(probs, 1e-12, 1.0))
    rows = np.arange(len(labels))

    def nll(t: float) -> float:
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        return float(-(z[rows, labels] - np.log(np.exp(z).sum(axis=1))).mean())

    return float(minimize_scalar(nll, bounds=(0.05, 20.0), method="bounded").x)


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    z = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_noise_model(
    probs: np.ndarray,
    given: np.ndarray,
    vendor: np.ndarray,
    n_vendors: int | None = None,
    prior_strength: float = 2.0,
    max_iter: int = 500,
    tol: float = 1e-6,
    initial_confusion: np.ndarray | None = None,
) -> NoiseModel:
    """Fit per-vendor confusion matrices by EM.

    Parameters
    ----------
    probs : (N, K) out-of-fold class probabilities of a classifier trained on the given labels.
    given : (N,) int given label per image.
    vendor : (N,) int vendor index per image.
    prior_strength : pseudo-counts per row of each confusion matrix, spread as the vendor's current
        uniform-noise fit, so rare (true, given) pairs shrink toward "errors fall anywhere".
    """
    n, k = probs.shape
    n_vendors = int(vendor.max()) + 1 if n_vendors is None else n_vendors
    temperature = fit_temperature(probs, given)
    noisy = apply_temperature(probs, temperature)
    eye = np.eye(k)
    confusion = np.repeat((0.9 * eye + 0.1 * (1 - eye) / (k - 1))[None], n_vendors, axis=0) \
        if initial_confusion is None else initial_confusion.copy()
    weights = np.bincount(vendor, minlength=n_vendors) / n
    cell = vendor * k + given  # which (vendor, given label) column each image adds to
    previous = None
    for iteration in range(1, max_iter + 1):
        mean_confusion = np.tensordot(weights, confusion, axes=1)
        clean = noisy @ np.linalg.pinv(mean_confusion)
        np.clip(clean, EPS, None, out=clean)
        clean /= clean.sum(axis=1, keepdims=True)
        posterior = clean * confusion[vendor, :, given]  # C_v[k, given_i] for every k: (N, K)
        posterior /= posterior.sum(axis=1, keepdims=True)
        counts = np.zeros((n_vendors * k, k))
        np.add.at(counts, cell, posterior)  # (V * K given, K true)
        counts = counts.reshape(n_vendors, k, k).transpose(0, 2, 1)  # (V, K true, K given)
        diag = np.trace(counts, axis1=1, axis2=2) / np.maximum(counts.sum(axis=(1, 2)), EPS)
        pseudo = prior_strength * (diag[:, None, None] * eye + (1 - diag[:, None, None]) * (1 - eye) / (k - 1))
        counts = counts + pseudo
        confusion = counts / counts.sum(axis=2, keepdims=True)
        if previous is not None and np.abs(posterior - previous).max() < tol:
            break
        previous = posterior
    return NoiseModel(posterior, clean, confusion, temperature, iteration)


@dataclass
class VendorRates:
    """Per vendor (V,): estimated error rate and its 95% interval (fractions)."""

    rate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    bootstrap: np.ndarray  # (B, V) bootstrap replicates of the rates


def vendor_error_rates(
    probs: np.ndarray,
    given: np.ndarray,
    vendor: np.ndarray,
    counted: np.ndarray | None = None,
    n_boot: int = 200,
    seed: int = 0,
) -> VendorRates:
    """Estimated share of each vendor's images with a wrong label, with bootstrap 95% intervals.

    ``counted`` (N,) bool marks images whose p_error counts as an error (ambiguous ones excluded);
    the bootstrap resamples images within each vendor and refits the whole noise model.
    """
    n_vendors = int(vendor.max()) + 1
    counted = np.ones(len(given), bool) if counted is None else counted

    def rates(model: NoiseModel, index: np.ndarray) -> np.ndarray:
        err = model.p_error(given[index]) * counted[index]
        return np.bincount(vendor[index], weights=err, minlength=n_vendors) / np.maximum(
            np.bincount(vendor[index], minlength=n_vendors), 1)

    full = fit_noise_model(probs, given, vendor, n_vendors)
    point = rates(full, np.arange(len(given)))

    def refit(index: np.ndarray) -> np.ndarray:
        # warm start from the full fit: EM from there settles in a few dozen steps
        model = fit_noise_model(probs[index], given[index], vendor[index], n_vendors, max_iter=60, tol=1e-5,
                                initial_confusion=full.confusion)
        return rates(model, index)

    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(vendor == v) for v in range(n_vendors)]
    boot = np.array([refit(np.concatenate([rng.choice(g, len(g)) for g in groups])) for _ in range(n_boot)])
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    # the percentile interval is centred on the bootstrap mean; recentre it on the point estimate
    shift = point - boot.mean(axis=0)
    return VendorRates(point, np.clip(low + shift, 0, 1), np.clip(high + shift, 0, 1), boot)
