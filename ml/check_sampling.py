"""Which images to check by hand, and error rates from the checks that stay valid whatever the model.

Design. Each plan is a Poisson sample: image ``i`` is drawn independently with a known inclusion
probability ``pi_i``. Within a vendor the probabilities mix a uniform part (``uniform_share`` of the
budget, so that no image has a tiny probability) with a part proportional to the model's uncertainty
about the label, ``sqrt(f (1 - f))`` with ``f`` the image's probability of error: checks go where the
model cannot tell (Zrnic & Candes, active statistical inference, 2024). Plans are drawn over every
image, already checked ones included (drawn again, they cost nothing), so that rounds are independent
and an image's probability of being checked in at least one round is ``1 - prod_r (1 - pi_ir)``.
Gold images are checked with probability 1.

Estimate (prediction-powered inference, Angelopoulos et al. 2023, with a fitted weight ``lam`` as in
PPI++ and an offset ``c``): per vendor of ``N`` images,

    rate = c + lam * mean_i f_i + (1/N) sum_{checked i} (e_i - c - lam f_i) / pi_i

with ``e_i`` the checked error. The sum is a Horvitz-Thompson estimate of what the model-based part
misses, so the estimate is unbiased whatever the model; ``c`` and ``lam`` (fitted to the checks,
``lam`` in [0, 1]) let a useless model fall back to the checks alone. Its variance is estimated by the
Horvitz-Thompson variance of the residuals ``e_i - c - lam f_i`` under Poisson sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from ml.estimate import clopper_pearson, keyed_uniform, wilson_interval

# share of each vendor's checks spread evenly: every image gets at least 80% of the uniform probability.
# Measured (BENCHMARKS.md, the same plan draws against 0.5): at 100 and 200 checks every vendor of eight
# scenarios covered at least 95.8% (92.7% at worst with 0.5, where errors sit where the model is sure),
# with narrower intervals
UNIFORM_SHARE = 0.8
LEVEL = 0.95
# below this many effective errors found (Kish, by weight) the residual variance rests on too few
# errors to trust, and the checks-only interval bounds it (docs/method.md: measured in the bench)
MIN_ERRORS_FOR_NORMAL = 5
# under this many checks a vendor's errors that the model does not see (a weight 1/pi each) are
# mostly missed, the estimate's distribution is skewed low, and the checks-only upper bound
# holds the interval up (measured: 81% coverage on a 25% pair-swapping vendor at 50 checks without it)
MIN_CHECKS_FOR_NORMAL = 100
# a weighted variance of the model's error probabilities (in [0, 1]) below this share of the weights is
# rounding, not information: the control's slope is then 0 rather than a ratio of two rounding errors
_FLAT = 1e-12


def inclusion_probabilities(p_error: np.ndarray, group: np.ndarray, budget: np.ndarray,
                            uniform_share: float = UNIFORM_SHARE) -> np.ndarray:
    """(N,) inclusion probabilities for one plan: within each group ``g`` they sum to
    ``min(budget[g], N_g)`` (expected checks), each in (0, 1] wherever the budget is positive.

    Parameters
    ----------
    p_error : (N,) the model's probability that each image's label is wrong.
    group : (N,) int group (vendor) index per image.
    budget : (G,) expected number of checks per group.
    uniform_share : share of each group's budget spread evenly over its images.
    """
    p = np.clip(np.asarray(p_error, float), 0.0, 1.0)
    uncertainty = np.sqrt(p * (1 - p)) + 1e-6
    pi = np.zeros(len(p))
    for g, n in enumerate(np.asarray(budget, float)):
        members = np.flatnonzero(group == g)
        if not len(members) or n <= 0:
            continue
        # a plan under MIN_CHECKS_FOR_NORMAL is held to the checks-only bound, which uneven
        # probabilities only widen (fewer effective checks): there the checks are spread evenly
        spread_evenly = uniform_share if n >= MIN_CHECKS_FOR_NORMAL else 1.0
        n = min(n, len(members))
        u = uncertainty[members]
        share = spread_evenly / len(members) + (1 - spread_evenly) * u / u.sum()  # sums to 1
        pi[members] = _capped(share, n)
    return pi


def _capped(share: np.ndarray, total: float) -> np.ndarray:
    """``total * share`` with no value above 1: the excess of capped images spread over the others."""
    pi = np.zeros_like(share)
    free = np.ones(len(share), bool)
    remaining = total
    while True:
        pi[free] = remaining * share[free] / share[free].sum()
        over = free & (pi >= 1)
        if not over.any():
            return np.minimum(pi, 1.0)
        pi[over] = 1.0
        free &= ~over
        remaining = total - (~free).sum()
        if not free.any() or remaining <= 0:
            return np.minimum(pi, 1.0)


def draw_plan(pi: np.ndarray, keys: np.ndarray, round_number: int) -> np.ndarray:
    """(N,) bool: which images a plan draws, each independently with probability ``pi`` (N,).

    The draw is a function of each image's key (N,) and the plan's ``round_number``, so a plan can be
    reproduced from the recorded probabilities."""
    return keyed_uniform(keys, salt=10_007 + round_number) < pi


def combined_inclusion(rounds: list[np.ndarray]) -> np.ndarray:
    """(N,) probability of being drawn in at least one of independent rounds, each (N,)."""
    missed = np.ones(len(rounds[0])) if rounds else np.ones(0)
    for pi in rounds:
        missed = missed * (1 - np.clip(pi, 0, 1))
    return 1 - missed


@dataclass
class CheckedRates:
    """Per group (G,): the combined estimate and its interval (``rate, low, high``); the checks alone
    (``checks_rate, checks_low, checks_high``, Wilson); ``n_checked`` (checks that are part of the design,
    gold included), ``checked_errors`` (errors among them), ``weight`` (the PPI++ ``lam``)."""

    rate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    checks_rate: np.ndarray
    checks_low: np.ndarray
    checks_high: np.ndarray
    n_checked: np.ndarray
    checked_errors: np.ndarray
    weight: np.ndarray


def checked_error_rates(model_error: np.ndarray, checked: np.ndarray, error: np.ndarray, inclusion: np.ndarray,
                        group: np.ndarray, n_groups: int, level: float = LEVEL) -> CheckedRates:
    """Error rate per group from the model's per-image probability of error and the hand checks.

    Parameters
    ----------
    model_error : (N,) the model's probability that each label is wrong (``f``).
    checked : (N,) bool, checked images that belong to the design (a plan drew them, or gold).
    error : (N,) bool, the checked verdict (read where ``checked``): the label is not in the checked set.
    inclusion : (N,) probability that each image was checked (combined over plans; 1 for gold).
    group : (N,) int group index.

    The estimate is ``offset + lam mean(f)`` plus the Horvitz-Thompson sum of the checked residuals
    ``e - offset - lam f``; ``offset`` and ``lam`` are fitted to the checks (:func:`_fit_control`).
    The interval is Korn and Graubard's: the exact binomial interval at the effective number of checks
    that the standard error implies (:func:`_exact_at_effective_n`). The standard error is the largest
    of three estimates: the Horvitz-Thompson variance of the checked residuals; the variance the
    design implies over all the group's images if each image's error probability were
    ``offset + lam f``; and the delete-one jackknife over the checks, which carries the error of
    fitting ``offset`` and ``lam`` on the same checks (:func:`_jackknife_se`). The first alone
    under-covers when errors are rare, since an error where the model saw none has a large weight and
    is seldom drawn (measured: 84% coverage at 200 checks on a 5% vendor); without the jackknife, a
    vendor whose real errors sit on hard images covered 91.5% at 100 checks (docs/method.md). While
    the errors found amount to fewer than
    ``MIN_ERRORS_FOR_NORMAL`` effective errors (Kish, by their weights ``1/pi``) the interval also
    contains the checks-only Wilson interval: too few errors to stand on; with fewer than
    ``MIN_CHECKS_FOR_NORMAL`` checks planned (the sum of the group's inclusion probabilities) its
    upper bound is at least the checks-only one.
    """
    f = np.clip(np.asarray(model_error, float), 0, 1)
    checked = np.asarray(checked, bool) & (np.asarray(inclusion, float) > 0)
    e = np.asarray(error, bool) & checked
    out = {name: np.zeros(n_groups) for name in ("rate", "low", "high", "checks_rate", "checks_low",
                                                 "checks_high", "n_checked", "checked_errors", "weight")}
    for g in range(n_groups):
        members = np.flatnonzero(group == g)
        n_images = len(members)
        if not n_images:
            out["checks_high"][g] = out["high"][g] = 1.0
            continue
        sample = members[checked[members]]
        pi, fs, es = np.asarray(inclusion, float)[sample], f[sample], e[sample].astype(float)
        spread = (1 - pi) / pi ** 2  # Horvitz-Thompson variance weight of each checked image
        offset, lam = _fit_control(es, fs, spread)
        residual = es - offset - lam * fs
        rate = offset + lam * f[members].mean() + (residual / pi).sum() / n_images
        sampled_se = np.sqrt((spread * residual ** 2).sum()) / n_images
        se = max(sampled_se, _design_se(f[members], np.asarray(inclusion, float)[members], offset, lam))
        se = max(se, _jackknife_se(es, fs, pi, float(f[members].mean()), n_images))
        # checks alone: the weighted share of errors, Wilson interval at the effective number of checks
        checks_rate = (es / pi).sum() / (1 / pi).sum() if len(sample) else np.nan
        n_effective = (1 / pi).sum() ** 2 / (1 / pi ** 2).sum() if len(sample) else 0.0
        checks_low, checks_high = wilson_interval(np.array([0.0 if np.isnan(checks_rate) else checks_rate])
                                                  * n_effective, np.array([n_effective]), level)
        low, high = _exact_at_effective_n(rate, se, level)
        weighted = es / pi  # errors count by their weight: a few heavy ones are little evidence
        effective_errors = weighted.sum() ** 2 / (weighted ** 2).sum() if es.any() else 0.0
        if effective_errors < MIN_ERRORS_FOR_NORMAL:
            low, high = min(low, float(checks_low[0])), max(high, float(checks_high[0]))
        elif round(float(np.asarray(inclusion, float)[members].sum()), 6) < MIN_CHECKS_FOR_NORMAL:
            high = max(high, float(checks_high[0]))  # planned checks (the design's size, not this draw's)
        out["rate"][g] = np.clip(rate, 0, 1)
        out["low"][g] = np.clip(low, 0, 1)
        out["high"][g] = np.clip(high, 0, 1)
        out["checks_rate"][g] = checks_rate
        out["checks_low"][g], out["checks_high"][g] = checks_low[0], checks_high[0]
        out["n_checked"][g] = len(sample)
        out["checked_errors"][g] = es.sum()
        out["weight"][g] = lam
    return CheckedRates(**out)


def _jackknife_se(e: np.ndarray, f: np.ndarray, pi: np.ndarray, f_mean: float, n_images: int) -> float:
    """Delete-one jackknife standard error of the combined estimate over the n checked images (n,):
    each replicate leaves one check out, refits ``offset`` and ``lam`` on the others (as
    :func:`_fit_control`) and reweights their Horvitz-Thompson sum by ``n / (n - 1)``. It carries what
    fitting the control on the same checks adds to the error, which the residual variance alone
    misses; it ignores the finite population, so it errs on the wide side.

    The n refits are computed at once from the full sums less each check's own term (O(n), not a loop
    of n fits); ``e`` and ``f`` are centred first so that those differences keep their precision."""
    n = len(e)
    if n < 3:
        return 0.0
    e_shift, f_shift = float(e.mean()), float(f.mean())
    e, f, f_mean = e - e_shift, f - f_shift, f_mean - f_shift  # the replicates move by -e_shift: SE unchanged

    def left_out(x: np.ndarray) -> np.ndarray:  # (n,) the sum of x over every check but one
        return x.sum() - x

    spread = (1 - pi) / pi ** 2
    total = left_out(spread)
    fitted = total > 0
    per_weight = np.where(fitted, total, 1.0)
    e_mean, f_weighted = left_out(spread * e) / per_weight, left_out(spread * f) / per_weight
    f_variance = left_out(spread * f * f) - f_weighted * left_out(spread * f)
    covariance = left_out(spread * e * f) - e_mean * left_out(spread * f)
    varies = fitted & (f_variance > _FLAT * total)
    lam = np.where(varies, np.clip(covariance / np.where(varies, f_variance, 1.0), 0, 1), 0.0)
    offset = np.where(fitted, e_mean - lam * f_weighted, -e_shift)  # a zero offset in the original units
    residual_sum = left_out(e / pi) - offset * left_out(1 / pi) - lam * left_out(f / pi)
    replicates = offset + lam * f_mean + n / (n - 1) * residual_sum / n_images
    return float(np.sqrt((n - 1) / n * ((replicates - replicates.mean()) ** 2).sum()))


def _exact_at_effective_n(rate: float, se: float, level: float) -> tuple[float, float]:
    """Korn and Graubard's interval for a survey estimate: the exact (Clopper-Pearson) interval of
    ``rate`` at the number of checks ``rate (1 - rate) / se^2`` that would give its standard error
    ``se`` (the design effect). Normal where ``rate`` is at or outside 0 and 1, or ``se`` is 0."""
    if se > 0 and 0 < rate < 1:
        n_effective = rate * (1 - rate) / se ** 2
        low, high = clopper_pearson(np.array([rate * n_effective]), np.array([n_effective]), level)
        return float(low[0]), float(high[0])
    z = norm.ppf(1 - (1 - level) / 2)
    return rate - z * se, rate + z * se


def _fit_control(e: np.ndarray, f: np.ndarray, spread: np.ndarray) -> tuple[float, float]:
    """``(offset, lam)`` minimising the estimated variance ``sum spread (e - offset - lam f)^2`` over the
    checked images (n,), with ``lam`` in [0, 1]. The offset uses the one auxiliary figure known exactly
    (every image counts 1): without it the Horvitz-Thompson sum of a Poisson sample carries the
    randomness of its size, and a useless model's interval is wider than the checks' own (the variance
    of the error indicator about 0 is ``rate``, about its mean ``rate (1 - rate)``)."""
    total = spread.sum()
    if total <= 0:  # every checked image was certain to be checked: the estimate is exact
        return 0.0, 0.0
    e_mean, f_mean = (spread * e).sum() / total, (spread * f).sum() / total
    f_variance = (spread * (f - f_mean) ** 2).sum()
    varies = f_variance > _FLAT * total
    lam = float(np.clip((spread * (e - e_mean) * (f - f_mean)).sum() / f_variance, 0, 1)) if varies else 0.0
    return float(e_mean - lam * f_mean), lam


def _design_se(f: np.ndarray, pi: np.ndarray, offset: float, lam: float) -> float:
    """Standard error (scalar) of one group's estimate implied by the design: inclusion probabilities
    ``pi`` (N,) and error probabilities ``offset + lam f`` (N,, clipped to [0, 1]), the fitted
    relation between the model and the checks. Images never drawn (pi 0) cannot be in the sample and
    add nothing."""
    q = np.clip(offset + lam * f, 0, 1)
    residual_variance = q * (1 - q) + (q - offset - lam * f) ** 2
    drawn = pi > 0
    return float(np.sqrt(((1 - pi[drawn]) / pi[drawn] * residual_variance[drawn]).sum()) / len(f))


def expected_halfwidth(model_error: np.ndarray, inclusion: np.ndarray, level: float = LEVEL) -> float:
    """The 95% half-width one group's combined estimate is expected to have with per-image inclusion
    probabilities ``inclusion`` (N,), taking the model's ``model_error`` (N,) as calibrated
    (the residual of a checked image has variance ``f (1 - f)``). Images never drawn make it infinite."""
    f = np.clip(np.asarray(model_error, float), 0, 1)
    pi = np.asarray(inclusion, float)
    if np.any(pi <= 0):
        return float("inf")
    variance = ((1 - pi) / pi * f * (1 - f)).sum() / len(f) ** 2
    return float(norm.ppf(1 - (1 - level) / 2) * np.sqrt(variance))


def expected_interval(model_error: np.ndarray, inclusion: np.ndarray, rate: float,
                      level: float = LEVEL) -> tuple[float, float]:
    """The interval (low, high) one group's estimate is expected to have around ``rate`` with inclusion
    probabilities ``inclusion`` (N,): :func:`expected_halfwidth`, and, where the model expects fewer
    than MIN_ERRORS_FOR_NORMAL errors among the checks, the checks-only interval that the estimate
    will then contain (at the design's effective number of checks ``N^2 / sum(1/pi)``, ``rate`` of them
    wrong), so that a group the model calls perfect is not promised a zero-width interval; under
    MIN_CHECKS_FOR_NORMAL expected checks, that interval's upper bound.
    (nan, nan) while some image has probability 0."""
    f = np.clip(np.asarray(model_error, float), 0, 1)
    pi = np.asarray(inclusion, float)
    half = expected_halfwidth(f, pi, level)
    if not np.isfinite(half):
        return float("nan"), float("nan")
    low, high = rate - half, rate + half
    n_effective = len(f) ** 2 / (1 / pi).sum()
    bound_low, bound_high = wilson_interval(np.array([rate * n_effective]), np.array([n_effective]), level)
    if (pi * f).sum() < MIN_ERRORS_FOR_NORMAL:
        low, high = min(low, float(bound_low[0])), max(high, float(bound_high[0]))
    elif round(float(pi.sum()), 6) < MIN_CHECKS_FOR_NORMAL:  # a budget of exactly 100 is not under 100
        high = max(high, float(bound_high[0]))
    return max(0.0, low), min(1.0, high)


def checks_for_halfwidth(model_error: np.ndarray, earlier: np.ndarray, target: float, rate: float,
                         uniform_share: float = UNIFORM_SHARE, level: float = LEVEL) -> int:
    """The smallest number of further checks (one more plan over these N images) whose expected
    interval (:func:`expected_interval` around ``rate``) has a half-width of at most ``target``;
    ``earlier`` (N,) is each image's inclusion probability so far. Returns N when even checking every
    image would not do (the half-width is then 0 anyway)."""
    n_images = len(model_error)
    single = np.zeros(n_images, np.int64)

    def halfwidth(budget: int) -> float:
        plan = inclusion_probabilities(model_error, single, np.array([budget]), uniform_share) if budget \
            else np.zeros(n_images)
        low, high = expected_interval(model_error, combined_inclusion([earlier, plan]), rate, level)
        return (high - low) / 2 if np.isfinite(low) else float("inf")

    if halfwidth(0) <= target:
        return 0
    low, high = 1, n_images
    while low < high:  # bisection: the half-width falls as the budget grows
        middle = (low + high) // 2
        if halfwidth(middle) <= target:
            high = middle
        else:
            low = middle + 1
    return int(low)
