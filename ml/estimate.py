"""Per-vendor noise models fitted jointly with a classifier's out-of-fold probabilities.

Each vendor ``v`` is a Dawid-Skene annotator with a confusion matrix ``C_v[true, given]``. The
classifier was trained on the vendors' noisy labels, so its calibrated probabilities estimate
``P(given | x) = P(true | x) @ T`` with ``T`` the image-weighted mean of the vendors' matrices; the
clean class prior is recovered as ``P(given | x) @ inv(T)``. EM alternates between the posterior of
each image's true class and the vendors' matrices. Vendor rates are then corrected for how much of
a wrong label the posterior counts, measured with errors injected on purpose (docs/method.md).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import scipy.sparse
from scipy.optimize import minimize_scalar
from threadpoolctl import threadpool_limits

EPS = 1e-6
# rows an EM step works through at a time, so that a block's arrays stay in cache between its passes.
# Measured, 4 float32 fits of 25 steps at K = 10, 1 / 2 threads: a million images 9.1 / 5.1 s with
# whole-array passes, 4.7 / 2.4 s in blocks of 16,384; 100,000 images the same either way. Smaller
# blocks hold the GIL too often for the bootstrap's threads (4,096: 2.9 s at 2 threads)
EM_BLOCK_ROWS = 16_384
log = logging.getLogger(__name__)


def key_hashes(keys: np.ndarray) -> np.ndarray:
    """(N,) uint64 hashes of keys (N,) str, for :func:`keyed_uniform` (hash once, draw many times)."""
    return np.array([int.from_bytes(hashlib.blake2b(str(k).encode(), digest_size=8).digest(), "little")
                     for k in keys], dtype=np.uint64)


def keyed_uniform(keys: np.ndarray, salt: int, hashes: np.ndarray | None = None) -> np.ndarray:
    """(N,) uniforms in [0, 1), each a function of its key (N,) str and ``salt`` only; ``hashes`` the
    keys' :func:`key_hashes` when already at hand.

    Random draws keyed by image content stay the same for an image whatever else is in the data, so
    a vendor's estimate does not move when unrelated images arrive, and identical deliveries get
    identical draws.
    """
    base = key_hashes(keys) if hashes is None else hashes
    with np.errstate(over="ignore"):  # splitmix64: wrap-around arithmetic is the point
        x = base + np.uint64((0x9E3779B97F4A7C15 * (salt + 1)) % 2**64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


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


def in_threads(work: Callable, items: Iterable, workers: int | None = None) -> list:
    """``[work(item) for item in items]``, one thread per core the process may use.

    EM refits spend their time in numpy and scipy calls on large (N, K) arrays, which release the GIL;
    BLAS is held to one thread meanwhile, because its own threads on an (N, K) @ (K, K) product cost
    more than they give (measured at 100,000 images on 2 cores, 50 replicates: 24.9 s with BLAS
    threads, 17.3 s without, 10.6 s on two threads of our own). ``items`` are drawn in order, at
    most two per thread ahead, so a generator that draws random numbers draws them as a plain loop
    would and holds few of them at once. Call it from one thread at a time: the BLAS limit is the
    process's.
    """
    workers = len(os.sched_getaffinity(0)) if workers is None else workers
    with threadpool_limits(limits=1, user_api="blas"):
        if workers <= 1:
            return [work(item) for item in items]
        results, pending = [], collections.deque()
        with ThreadPoolExecutor(workers) as pool:
            for item in items:
                pending.append(pool.submit(work, item))
                if len(pending) >= 2 * workers:
                    results.append(pending.popleft().result())
            results.extend(future.result() for future in pending)
        return results


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
    tol: float = 1e-5,
    initial_confusion: np.ndarray | None = None,
    sample_weight: np.ndarray | None = None,
    temperature: float | None = None,
    trained: np.ndarray | None = None,
    accelerate: bool = True,
    dtype: type = np.float64,
) -> NoiseModel:
    """Fit per-vendor confusion matrices by EM.

    Parameters
    ----------
    probs : (N, K) out-of-fold class probabilities of a classifier trained on the given labels.
    given : (N,) int given label per image.
    vendor : (N,) int vendor index per image.
    prior_strength : pseudo-counts per row of each confusion matrix, spread as the vendor's current
        uniform-noise fit, so rare (true, given) pairs shrink toward "errors fall anywhere".
    sample_weight : (N,) optional weight per image (bootstrap replicates use resampling counts).
    temperature : the calibration to apply; fitted to the given labels when None.
    trained : (N,) bool, the images whose labels trained the classifier (default: all). Its outputs
        mix the noise of those labels only, so the temperature and the mean confusion ``T`` come from
        them: images scored later (a new delivery, a new vendor) change neither, and so do not move
        the other vendors' estimates.
    max_iter : the most EM steps; ``iterations`` of the result counts those taken.
    accelerate : extrapolate every two EM steps (SQUAREM), which reaches the same fixed point in
        4-6x fewer steps where plain EM crawls (docs/method.md); False: plain EM steps.
    dtype : of the (N, K) arrays the steps stream through. float32 halves the memory they read and
        write, which bounds a step at a million images (80 -> 53 ms), but leaves noise of about 1e-7
        in each posterior: fits that stop at ``tol`` need float64; a fixed number of steps does not.
    """
    n, k = probs.shape
    n_vendors = int(vendor.max()) + 1 if n_vendors is None else n_vendors
    weight = np.ones(n) if sample_weight is None else np.asarray(sample_weight, float)
    trained = np.ones(n, bool) if trained is None else np.asarray(trained, bool)
    if not trained.any():
        raise ValueError("no image the classifier was trained on: the noise model needs its out-of-fold outputs")
    if temperature is None:
        temperature = fit_temperature(probs[trained], given[trained])
    noisy = apply_temperature(probs, temperature).astype(dtype, copy=False)
    eye = np.eye(k)
    confusion = np.repeat((0.9 * eye + 0.1 * (1 - eye) / (k - 1))[None], n_vendors, axis=0) \
        if initial_confusion is None else initial_confusion.copy()
    mixed = weight * trained
    vendor_share = np.bincount(vendor, weights=mixed, minlength=n_vendors) / mixed.sum()
    cell = vendor * k + given  # which (vendor, given label) column each image adds to
    # a step makes several passes over its rows: done block by block, each block's passes run while it
    # is in the core's cache instead of streaming (N, K) arrays through memory once per pass
    blocks = [slice(start, min(start + EM_BLOCK_ROWS, n)) for start in range(0, n, EM_BLOCK_ROWS)]
    # summing a block's images into their cells is one sparse product: (V*K cells, rows) @ (rows, K)
    block_cells = [scipy.sparse.csr_matrix((weight[b].astype(dtype), (cell[b], np.arange(b.stop - b.start))),
                                           shape=(n_vendors * k, b.stop - b.start)) for b in blocks]
    ones, rows = np.ones(k, dtype), np.arange(n)
    # reused: a fresh (N, K) array per step costs its page faults
    posterior, clean, row_scale = np.empty((n, k), dtype), np.empty((n, k), dtype), np.empty(EM_BLOCK_ROWS, dtype)

    def em_step(confusion: np.ndarray) -> np.ndarray:
        """One EM iteration from ``confusion`` (V, K, K): fills ``posterior`` and the unnormalised
        ``clean`` prior; returns the next confusion."""
        mean_confusion = np.tensordot(vendor_share, confusion, axes=1)
        unmix = np.linalg.pinv(mean_confusion).astype(dtype)
        columns = confusion.transpose(0, 2, 1).reshape(n_vendors * k, k).astype(dtype)  # row v*K+g: C_v[:, g]
        counts = np.zeros((n_vendors * k, k))
        for block, summed_into_cells in zip(blocks, block_cells):
            block_clean, block_posterior = clean[block], posterior[block]
            scale = row_scale[:block.stop - block.start]
            # the clean prior's row normalisation cancels in the posterior: it is applied once, at the end
            np.matmul(noisy[block], unmix, out=block_clean)
            np.maximum(block_clean, EPS, out=block_clean)
            np.take(columns, cell[block], axis=0, out=block_posterior)
            np.multiply(block_posterior, block_clean, out=block_posterior)
            # row sums as a matrix-vector product, and one reciprocal per row: each several times faster
            np.matmul(block_posterior, ones, out=scale)
            np.reciprocal(scale, out=scale)
            np.multiply(block_posterior, scale[:, None], out=block_posterior)
            counts += summed_into_cells @ block_posterior  # float64 across blocks
        counts = counts.reshape(n_vendors, k, k).transpose(0, 2, 1)  # (V, K, K)
        diag = np.trace(counts, axis1=1, axis2=2) / np.maximum(counts.sum(axis=(1, 2)), EPS)
        pseudo = prior_strength * (diag[:, None, None] * eye + (1 - diag[:, None, None]) * (1 - eye) / (k - 1))
        counts = counts + pseudo
        return counts / counts.sum(axis=2, keepdims=True)

    def extrapolated(start: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """SQUAREM's step (Varadhan and Roland 2008) from two EM steps, kept row-stochastic."""
        r = first - start
        v = second - first - r
        alpha = min(-np.sqrt((r * r).sum() / max((v * v).sum(), 1e-300)), -1.0)  # -1: the plain step
        guess = np.clip(start - 2 * alpha * r + alpha * alpha * v, 1e-12, None)
        return guess / guess.sum(axis=2, keepdims=True)

    # converged when no image's probability of error moves by ``tol`` (one column, not all K: N reads
    # instead of 4 N K; it stopped at the same iteration as the whole posterior at 10k and 100k)
    previous_error = None
    iteration = 0
    while iteration < max_iter:
        if accelerate and iteration + 3 <= max_iter:
            start = confusion
            first = em_step(start)
            second = em_step(first)
            guess = extrapolated(start, first, second)
            confusion = em_step(guess)
            iteration += 3
            # no likelihood is at hand to check each step against (as SQUAREM does without an
            # objective); a residual-growth guard was measured to reject most good steps
            if not np.isfinite(confusion).all():
                confusion = em_step(second)  # a step off the simplex: go on from the plain steps
                iteration += 1
        else:
            confusion = em_step(confusion)
            iteration += 1
        error = posterior[rows, given]
        if previous_error is not None and np.abs(error - previous_error).max() < tol:
            break
        previous_error = error
    clean /= (clean @ ones)[:, None]
    return NoiseModel(posterior, clean, confusion, temperature, iteration)


@dataclass
class VendorRates:
    """Per vendor (V,): estimated error rate and its 95% interval (fractions).

    ``raw`` is the mean probability of error before the sensitivity correction; ``sensitivity`` the
    mean probability of error the estimator gives to labels known to be wrong (flips injected into each
    vendor's own labels); ``false_positive`` the model-implied probability of error on correct labels;
    ``n_images`` the vendor's image count; ``weak_detection`` True where the detector barely tells a
    vendor's wrong labels from right ones (slope under MIN_SLOPE), so its rate is uncertain;
    ``upper_only`` True where the data bound the rate from above only (the classifier learned from one
    vendor's labels, see :func:`vendor_error_rates`): the interval starts at 0."""

    rate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    bootstrap: np.ndarray  # (B, V) bootstrap replicates of the rates
    raw: np.ndarray
    sensitivity: np.ndarray
    false_positive: np.ndarray
    n_images: np.ndarray
    weak_detection: np.ndarray
    upper_only: np.ndarray | None = None

    def __post_init__(self):
        if self.upper_only is None:  # audits saved before the flag: none was bounded from above only
            self.upper_only = np.zeros(len(self.rate), bool)


CountedOf = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
# Below this many images a 95% interval is at least about 4 points wide even for a perfect vendor
# (exact binomial: 0 errors in 200 images leaves up to 1.8%; at 5% the interval is 2.4-9.0%), and the
# vendor's own confusion matrix has under 20 images per class to fit.
MIN_IMAGES_TO_RATE = 200
MIN_SLOPE = 0.2  # below this the detector barely tells wrong labels from right ones
PSEUDO_FLIPS = 10  # a vendor's sensitivity is shrunk toward the pooled one with this many pseudo flips
# Real annotators err where images are hard. Flips drawn with chance proportional to (1 - max clean prior)
# to this power are as hard to see as CIFAR-10N workers' errors (measured, docs/method.md): the interval's
# high end allows for errors that hard, since one label per image cannot tell how hard a vendor's are.
HARD_ERRORS_HARDNESS = 2.0


def _all_counted(clean_prior: np.ndarray, labels: np.ndarray, p_error: np.ndarray) -> np.ndarray:
    return np.ones(len(labels), bool)


def clopper_pearson(errors: np.ndarray, n: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Exact (Clopper-Pearson) interval, same shape as ``n``, for ``errors`` among ``n`` (both may be
    fractional); (0, 1) where ``n`` is 0."""
    from scipy.stats import beta

    n = np.asarray(n, float)
    k = np.clip(np.asarray(errors, float), 0, n)
    tail = (1 - level) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(k > 0, beta.ppf(tail, np.maximum(k, 1e-9), n - k + 1), 0.0)
        high = np.where(k < n, beta.ppf(1 - tail, k + 1, np.maximum(n - k, 1e-9)), 1.0)
    empty = n <= 0
    return np.where(empty, 0.0, low), np.where(empty, 1.0, high)


def wilson_interval(errors: np.ndarray, n: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval (same shape as ``errors``) for ``errors`` among ``n`` checks (both may be
    fractional)."""
    from scipy.stats import norm

    z = norm.ppf(1 - (1 - level) / 2)
    n = np.maximum(np.asarray(n, float), 1e-12)
    p = np.asarray(errors, float) / n
    centre = (p + z ** 2 / (2 * n)) / (1 + z ** 2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2)) / (1 + z ** 2 / n)
    errors = np.asarray(errors, float)
    # at 0 (or n) errors the bound is exactly 0 (or 1); rounding would leave it a hair inside
    return np.where(errors <= 0, 0.0, np.clip(centre - half, 0, 1)), np.where(errors >= n, 1.0, np.clip(centre + half, 0, 1))


def exact_binomial_interval(rate: np.ndarray, n: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Clopper-Pearson interval (V,) for ``rate * n`` errors among ``n`` images (at least 1).

    It is what the rate would be known to within if every error had been seen, so no estimate from
    ``n`` images is surer than it: a floor on the width of every interval.
    """
    n = np.maximum(np.asarray(n, float), 1.0)
    return clopper_pearson(np.clip(np.asarray(rate, float), 0, 1) * n, n, level)


@dataclass
class InjectedFlips:
    """Labels flipped on purpose, over every draw: ``vendor`` (M,) int and ``score`` (M,), the counted
    p_error the refitted estimator gives each flipped label; ``pooled_from`` (V,) bool, the vendors
    whose flips make the pooled measure (those the classifier trained on)."""

    vendor: np.ndarray
    score: np.ndarray
    pooled_from: np.ndarray
    image: np.ndarray | None = None  # (M,) the flipped image of each flip

    def sensitivity(self, weight: np.ndarray | None = None) -> np.ndarray:
        """(V,) mean score per vendor, shrunk toward the pooled mean with ``PSEUDO_FLIPS`` pseudo flips;
        ``weight`` (M,) counts each flip (bootstrap resampling), default 1."""
        n_vendors = len(self.pooled_from)
        weight = np.ones(len(self.score)) if weight is None else weight
        found = np.bincount(self.vendor, weights=self.score * weight, minlength=n_vendors)
        injected = np.bincount(self.vendor, weights=weight, minlength=n_vendors)
        pooled = found[self.pooled_from].sum() / max(injected[self.pooled_from].sum(), 1.0)
        return (found + PSEUDO_FLIPS * pooled) / (injected + PSEUDO_FLIPS)


def confusion_shaped_targets(confusion: np.ndarray, vendor: np.ndarray, given: np.ndarray,
                             u: np.ndarray) -> np.ndarray:
    """(N,) a class other than ``given`` (N,) per image, drawn by ``u`` (N,) in [0, 1) from the row of
    the given class in its vendor's ``confusion`` (V, K, K) without the diagonal: where that vendor's
    errors from that class go, by the fitted model."""
    k = confusion.shape[1]
    rows = np.arange(len(given))
    off = confusion[vendor, given]  # (N, K): C_v[given, :]
    off[rows, given] = 0.0  # fancy indexing made a copy
    cdf = np.cumsum(off, axis=1) / np.maximum(off.sum(axis=1, keepdims=True), 1e-12)
    target = np.minimum((cdf <= u[:, None]).sum(axis=1), k - 1)
    return np.where(target == given, (given + 1) % k, target)  # u rounding onto the last, given class


def hard_image_weights(clean_prior: np.ndarray, vendor: np.ndarray, hardness: float) -> np.ndarray:
    """(N,) weights with mean 1 within each vendor (N,), proportional to ``doubt ** hardness``, the doubt
    being one minus the clean prior's (N, K) largest class probability: where people err, the images
    are hard (real annotators' errors cluster on images a classifier is unsure of; ``hardness`` 0 is
    a uniform draw). ``given`` (N,) is unused by the weights and kept for the flip draw's signature."""
    doubt = np.clip(1.0 - clean_prior.max(axis=1), 1e-6, 1.0) ** hardness
    mean = np.bincount(vendor, weights=doubt) / np.maximum(np.bincount(vendor), 1)
    return doubt / np.maximum(mean[vendor], 1e-12)


def inject_flips(probs: np.ndarray, given: np.ndarray, vendor: np.ndarray, model: NoiseModel,
                 counted_of: CountedOf = _all_counted, share: float = 0.03, repeats: int = 12,
                 seed: int = 0, draw_keys: np.ndarray | None = None,
                 trained: np.ndarray | None = None, like_confusion: bool = False,
                 hardness: float = 0.0) -> InjectedFlips:
    """The counted probability of error the estimator gives labels known to be wrong.

    Out-of-fold probabilities do not depend on an image's own label, so flipping a random ``share`` of
    each vendor's labels to another class makes errors whose positions are known, without retraining.
    The noise model is refitted on the flipped labels (warm-started), so that flipped labels, like real
    errors, shape the confusion counts that judge them, over ``repeats`` draws. The flips raise each
    vendor's noise by ``share``, which makes the measure read a few points high (measured in
    tests/test_estimate.py).

    Which images are flipped, and to which class, is a function of each image's ``draw_keys`` (N,)
    (its content hash; default its position), so a vendor's measure does not change when other images
    arrive. A vendor with few flips is shrunk toward the pooled measure (``PSEUDO_FLIPS``): three images
    give no flip at all, and their vendor gets the pooled sensitivity instead of none.

    A flipped label goes to any other class alike, or with ``like_confusion`` where the vendor's fitted
    confusion sends errors from the given class (:func:`confusion_shaped_targets`): errors between
    classes the classifier itself confuses are harder to see, so the second measure can be lower.
    """
    n_vendors = model.confusion.shape[0]
    k = probs.shape[1]
    keys = np.arange(len(given)).astype(str) if draw_keys is None else np.asarray(draw_keys)
    hashes = key_hashes(keys)  # once: every draw below is keyed by them
    flip_chance = np.full(len(given), share)
    if hardness > 0:
        flip_chance = share * hard_image_weights(model.clean_prior, vendor, hardness)

    def flip_and_refit(repeat: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        salt = 1_000_003 * seed + 2 * repeat
        flipped = keyed_uniform(keys, salt, hashes) < flip_chance
        u = keyed_uniform(keys, salt + 1, hashes)
        if like_confusion:
            target = confusion_shaped_targets(model.confusion, vendor, given, u)
        else:
            target = (given + 1 + np.minimum((u * (k - 1)).astype(np.int64), k - 2)) % k
        labels = given.copy()
        labels[flipped] = target[flipped]
        # 50 accelerated steps end nearer the fixed point than 100 plain ones (docs/method.md)
        refit = fit_noise_model(probs, labels, vendor, n_vendors, max_iter=50, initial_confusion=model.confusion,
                                temperature=model.temperature, trained=trained)
        p_error = refit.p_error(labels)
        score = p_error * counted_of(refit.clean_prior, labels, p_error)
        return vendor[flipped], score[flipped], np.flatnonzero(flipped)

    flip_vendor, flip_score, flip_image = zip(*in_threads(flip_and_refit, range(repeats)))
    # pooled over the vendors the classifier trained on, so that a vendor scored later moves no other
    pooled_from = np.bincount(vendor, weights=np.ones(len(given)) if trained is None else trained,
                              minlength=n_vendors) > 0
    return InjectedFlips(np.concatenate(flip_vendor), np.concatenate(flip_score), pooled_from,
                         np.concatenate(flip_image))


def model_false_positive(counted_error: np.ndarray, vendor: np.ndarray, n_vendors: int) -> np.ndarray:
    """(V,) the probability of error the model itself expects to give a correct label:
    sum(p * (1 - p)) / sum(1 - p) over a vendor's counted p_error ``p`` (N,)."""
    return np.bincount(vendor, weights=counted_error * (1 - counted_error), minlength=n_vendors) / \
        np.maximum(np.bincount(vendor, weights=1 - counted_error, minlength=n_vendors), 1e-12)


def classifier_allowance(excess: np.ndarray, anchors: np.ndarray) -> float:
    """How much of the vendors' ``excess`` (V,), raw rate minus ``f``, may be the classifier's own
    mistakes: the smallest excess among the ``anchors`` (V,) bool, at least 0.

    ``f`` counts the share of ``p_error`` the model expects on correct labels, and so misses the
    classifier's confident mistakes: images whose true class it all but rules out, where a correct
    label reads as an error. That share is about the same for every vendor, so the data cannot tell it
    from errors common to all vendors (measured: a perfect vendor's correct labels average about twice
    ``f``, and pair confusions the classifier shares raise every vendor 2-3 points). No vendor has fewer
    than 0 errors, so the share is at most the smallest excess: an interval's low end allows that much.
    """
    return max(0.0, float(np.min(excess[anchors])))


def _vendor_seed(seed: int, name: str) -> list[int]:
    return [seed, int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")]


def vendor_error_rates(
    probs: np.ndarray,
    given: np.ndarray,
    vendor: np.ndarray,
    model: NoiseModel | None = None,
    counted_of: CountedOf = _all_counted,
    n_boot: int = 200,
    seed: int = 0,
    vendor_names: list[str] | None = None,
    draw_keys: np.ndarray | None = None,
    trained: np.ndarray | None = None,
) -> VendorRates:
    """Estimated share of each vendor's images with a wrong label, with 95% intervals.

    The raw estimate, the mean counted p_error of a vendor's images, equals ``f + (s - f) * r`` for a
    true rate ``r``, where ``s`` is the p_error the estimator gives a wrong label (measured by injected
    flips) and ``f`` the p_error it gives a correct one (the noise model's own expectation). Inverting
    that line removes the shrinkage of soft posteriors toward the middle; the bootstrap (images
    resampled within each vendor, the whole noise model refitted, the injected flips resampled so that
    the uncertainty of ``s`` is in the interval) goes through the same line. The
    interval is at least as wide as the exact binomial interval of the vendor's image count. Its ends
    allow for what the data cannot tell (docs/method.md): the low end for the classifier's own
    confident mistakes (:func:`classifier_allowance`), the high end for errors as hard to see as flips
    shaped like the vendor's fitted confusion or placed on the images the classifier is unsure of
    (``s`` from :func:`inject_flips` with ``like_confusion`` or ``hardness``, where lower).

    ``counted_of(clean_prior, labels, p_error)`` (N,) bool marks labels whose p_error counts as an
    error (ambiguous images excluded); ``model`` is the fit on ``given`` when already at hand.
    ``vendor_names`` (V,) seed each vendor's bootstrap draws and ``draw_keys`` (N,) each image's
    injected flips, so that a vendor's estimate depends on its own images only; ``trained`` (N,) bool
    marks the images the classifier was trained on (see :func:`fit_noise_model`).
    """
    n_vendors = int(vendor.max()) + 1 if vendor_names is None else len(vendor_names)
    names = [str(v) for v in range(n_vendors)] if vendor_names is None else list(vendor_names)
    trained = np.ones(len(given), bool) if trained is None else np.asarray(trained, bool)
    model = fit_noise_model(probs, given, vendor, n_vendors, trained=trained) if model is None else model
    p_error = model.p_error(given)
    counted = counted_of(model.clean_prior, given, p_error)

    def rates(fit: NoiseModel, weight: np.ndarray, kept: np.ndarray | slice = slice(None)) -> np.ndarray:
        err = fit.p_error(given[kept]) * counted[kept] * weight
        return np.bincount(vendor[kept], weights=err, minlength=n_vendors) / np.maximum(
            np.bincount(vendor[kept], weights=weight, minlength=n_vendors), 1e-12)

    raw = rates(model, np.ones(len(given)))
    false_positive = model_false_positive(p_error * counted, vendor, n_vendors)
    flips = inject_flips(probs, given, vendor, model, counted_of, seed=seed, draw_keys=draw_keys, trained=trained)
    shaped_flips = inject_flips(probs, given, vendor, model, counted_of, seed=seed, draw_keys=draw_keys,
                                trained=trained, like_confusion=True)
    hard_flips = inject_flips(probs, given, vendor, model, counted_of, seed=seed, draw_keys=draw_keys,
                              trained=trained, hardness=HARD_ERRORS_HARDNESS)
    sensitivity = flips.sensitivity()
    slope = sensitivity - false_positive
    weak = slope < MIN_SLOPE
    if weak.any():
        log.warning("error detection is weak for %s (slope %s): their rates are uncertain",
                    ", ".join(np.array(names)[weak]), ", ".join(f"{x:.3f}" for x in slope[weak]))

    def corrected(values: np.ndarray, sensitivity: np.ndarray, allowance: float = 0.0) -> np.ndarray:
        floor = false_positive + allowance
        return np.clip((values - floor) / np.maximum(sensitivity - floor, MIN_SLOPE), 0, 1)

    n_images = np.bincount(vendor, minlength=n_vendors)
    anchors = flips.pooled_from & (n_images >= MIN_IMAGES_TO_RATE)
    anchors = anchors if anchors.any() else flips.pooled_from

    def allowance(values: np.ndarray) -> float:
        return classifier_allowance(values - false_positive, anchors)

    point = corrected(raw, sensitivity)
    groups = [np.flatnonzero(vendor == v) for v in range(n_vendors)]
    flip_groups = [np.flatnonzero(flips.vendor == v) for v in range(n_vendors)]
    shaped_groups = [np.flatnonzero(shaped_flips.vendor == v) for v in range(n_vendors)]
    hard_groups = [np.flatnonzero(hard_flips.vendor == v) for v in range(n_vendors)]
    # one generator per vendor, seeded by its name: its draws do not depend on the other vendors
    generators = [np.random.default_rng(_vendor_seed(seed, name)) for name in names]

    def resampled():
        # resample images within each vendor, as counts; the flips are resampled too, so that the
        # interval carries the uncertainty of the measured sensitivity. Drawn in replicate order.
        for _ in range(n_boot):
            weights = [np.zeros(len(given))] + [np.zeros(len(f.vendor)) for f in (flips, shaped_flips, hard_flips)]
            for members, rng in zip(zip(groups, flip_groups, shaped_groups, hard_groups), generators):
                for out, m in zip(weights, members):
                    if len(m):
                        # len(m) uniform draws counted: a multinomial with equal probabilities, drawn
                        # in O(len(m)) instead of one binomial per category (10 s of 50 at 100,000 images)
                        out[m] = np.bincount(rng.integers(0, len(m), len(m)), minlength=len(m))
            yield weights

    def replicate(weights: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One replicate as estimated, with the classifier allowance (low end), and with the lowest
        sensitivity of errors shaped like the vendor's confusions or placed on hard images (high end)."""
        weight, flip_weight, shaped_weight, hard_weight = weights
        kept = np.flatnonzero(weight)  # about 37% of images are not drawn: leave them out of the refit
        # warm-started from the full fit, 25 plain steps, as the benchmarks' coverage was measured
        # with: the replicates spread about 90-98% as far as converged ones (docs/method.md). A fixed
        # number of steps, so float32 serves (replicates within 3e-5 points of float64's at 100,000 images)
        refit = fit_noise_model(probs[kept], given[kept], vendor[kept], n_vendors, max_iter=25, tol=1e-5,
                                sample_weight=weight[kept], initial_confusion=model.confusion,
                                temperature=model.temperature, trained=trained[kept], accelerate=False,
                                dtype=np.float32)
        replicate_raw, replicate_sensitivity = rates(refit, weight[kept], kept), flips.sensitivity(flip_weight)
        hardest = np.minimum(shaped_flips.sensitivity(shaped_weight), hard_flips.sensitivity(hard_weight))
        return (corrected(replicate_raw, replicate_sensitivity),
                corrected(replicate_raw, replicate_sensitivity, allowance(replicate_raw)),
                corrected(replicate_raw, np.minimum(replicate_sensitivity, hardest)))

    replicates = in_threads(replicate, resampled())
    boot, boot_low, boot_high = (np.array([r[end] for r in replicates]).reshape(n_boot, n_vendors)
                                 for end in range(3))

    def percentile(replicates: np.ndarray, q: float, centre: np.ndarray) -> np.ndarray:
        # the percentile interval is centred on the bootstrap mean; recentre it on its point estimate
        return np.percentile(replicates, q, axis=0) + centre - replicates.mean(axis=0)

    low = np.minimum(percentile(boot, 2.5, point),
                     percentile(boot_low, 2.5, corrected(raw, sensitivity, allowance(raw))))
    hardest = np.minimum(sensitivity, np.minimum(shaped_flips.sensitivity(), hard_flips.sensitivity()))
    high = np.maximum(percentile(boot, 97.5, point), percentile(boot_high, 97.5, corrected(raw, hardest)))
    exact_low, exact_high = exact_binomial_interval(point, n_images)
    low = np.minimum(np.clip(low, 0, 1), exact_low)
    high = np.maximum(np.clip(high, 0, 1), exact_high)
    # A classifier that learned from one vendor's labels gives nothing to tell that vendor's errors
    # from its own mistakes, which only add to the estimate (measured: a vendor with no error, alone,
    # read 4.2% [0.8, 8.3] on Fashion-MNIST and 5.4% [2.1, 8.4] on photos): the data bound the rate
    # from above only, and the interval says so by starting at 0.
    upper_only = np.full(n_vendors, flips.pooled_from.sum() == 1)  # pooled_from: the vendors trained on
    low = np.where(upper_only, 0.0, low)
    return VendorRates(point, low, high, boot, raw, sensitivity, false_positive, n_images, weak, upper_only)
