"""Hand-check plans and the estimate that combines them with the model, on synthetic data with known truth."""

import numpy as np
import pytest

from ml.check_sampling import (MIN_CHECKS_FOR_NORMAL, UNIFORM_SHARE, checked_error_rates, checks_for_halfwidth, combined_inclusion, draw_plan,
                               _fit_control, _jackknife_se, expected_halfwidth, expected_interval,
                               inclusion_probabilities)
from ml.estimate import fit_noise_model
from test_estimate import synthetic


@pytest.fixture(scope="module")
def vendors():
    probs, given, true, vendor = synthetic([0.0, 0.05, 0.2], n_per_vendor=1000, seed=3)
    p_error = fit_noise_model(probs, given, vendor).p_error(given)
    wrong = given != true
    truth = np.array([wrong[vendor == v].mean() for v in range(3)])
    return p_error, wrong, vendor, truth, np.arange(len(given)).astype(str)


def test_inclusion_probabilities_spend_the_budget_and_leave_no_image_out(vendors):
    p_error, _, vendor, _, _ = vendors
    for budget in ([25, 50, 100], [900, 1000, 5000]):
        pi = inclusion_probabilities(p_error, vendor, np.array(budget))
        sums = np.bincount(vendor, weights=pi)
        np.testing.assert_allclose(sums, np.minimum(budget, 1000), rtol=1e-9)
        assert pi.min() > 0 and pi.max() <= 1
    pi = inclusion_probabilities(p_error, vendor, np.array([100, 100, 100]))
    floor = UNIFORM_SHARE * 100 / 1000
    assert pi.min() >= floor - 1e-12  # the uniform share keeps every image checkable
    # the rest of the budget goes to the model's uncertain images far more than to its sure ones
    uncertain = np.abs(p_error - 0.5) < 0.2
    assert (pi[uncertain] - floor).mean() > 3 * (pi[p_error < 0.01] - floor).mean()
    # under MIN_CHECKS_FOR_NORMAL the checks-only bound rules, and even checks give it the most checks
    small = inclusion_probabilities(p_error, vendor, np.array([25, 50, MIN_CHECKS_FOR_NORMAL - 1]))
    np.testing.assert_allclose(small, np.repeat([25, 50, MIN_CHECKS_FOR_NORMAL - 1], 1000) / 1000)


def test_the_interval_is_skewed_away_from_zero_when_few_errors_are_seen():
    # 400 even checks of 4,000 images find 8 errors; a model that says nothing (f constant)
    n = 4000
    pi = np.full(n, 0.1)
    checked = np.zeros(n, bool)
    checked[::10] = True
    wrong = np.zeros(n, bool)
    wrong[:80:10] = True
    rates = checked_error_rates(np.full(n, 0.02), checked, wrong, pi, np.zeros(n, int), 1)
    rate, low, high = float(rates.rate[0]), float(rates.low[0]), float(rates.high[0])
    assert rates.checked_errors[0] == 8 and rate == pytest.approx(0.02)
    symmetric_half = 1.96 * np.sqrt(0.02 * 0.98 * 0.9 / 400)  # the normal interval, finite population
    assert high - rate > symmetric_half > rate - low > 0  # skewed upward, as Wilson's is near 0


def test_a_few_heavily_weighted_errors_are_not_enough_evidence_for_the_normal_interval():
    # six errors found, but five among images the plan made near-certain (weight ~1) and one rare image
    # with weight 100: about 1.5 effective errors, so the checks-only interval is part of the interval
    n = 2000
    pi = np.full(n, 0.01)
    pi[:50] = 1.0
    wrong = np.zeros(n, bool)
    wrong[:5] = True
    wrong[100] = True
    checked = pi == 1.0
    checked[100:120] = True
    rates = checked_error_rates(np.full(n, 0.01), checked, wrong, pi, np.zeros(n, int), 1)
    assert rates.checked_errors[0] == 6
    assert rates.low[0] <= rates.checks_low[0] and rates.high[0] >= rates.checks_high[0]


def test_plans_are_reproducible_and_rounds_combine_as_independent_draws(vendors):
    p_error, _, vendor, _, keys = vendors
    pi = inclusion_probabilities(p_error, vendor, np.array([50, 50, 50]))
    assert (draw_plan(pi, keys, 1) == draw_plan(pi, keys, 1)).all()
    assert (draw_plan(pi, keys, 1) != draw_plan(pi, keys, 2)).any()
    np.testing.assert_allclose(combined_inclusion([np.array([0.5, 0.0, 1.0]), np.array([0.5, 0.2, 0.3])]),
                               [0.75, 0.2, 1.0])
    drawn = np.mean([draw_plan(pi, keys, r).sum() for r in range(50)])
    assert abs(drawn - 150) < 10  # expected draws: the budget


@pytest.mark.parametrize("model", ["classifier", "useless"])
def test_the_combined_estimate_is_unbiased_whatever_the_model(vendors, model):
    p_error, wrong, vendor, truth, keys = vendors
    f = p_error if model == "classifier" else np.random.default_rng(0).random(len(p_error))
    pi = inclusion_probabilities(f, vendor, np.array([60, 60, 60]))
    estimates = [checked_error_rates(f, draw_plan(pi, keys, r), wrong, pi, vendor, 3).rate for r in range(300)]
    bias = np.mean(estimates, axis=0) - truth
    standard_error = np.std(estimates, axis=0) / np.sqrt(len(estimates))
    assert np.all(np.abs(bias) <= 3 * standard_error + 0.002), (bias, standard_error)
    assert np.all(np.array(estimates)[:, 0] == 0)  # a perfect vendor has no error to find


def test_without_errors_found_the_interval_reaches_zero_and_is_no_surer_than_the_checks(vendors):
    p_error, wrong, vendor, _, keys = vendors
    perfect = vendor == 0
    pi = inclusion_probabilities(p_error[perfect], np.zeros(perfect.sum(), int), np.array([40]))
    drawn = draw_plan(pi, keys[perfect], 0)
    rates = checked_error_rates(p_error[perfect], drawn, wrong[perfect], pi, np.zeros(perfect.sum(), int), 1)
    assert rates.checked_errors[0] == 0 and rates.low[0] == 0
    assert rates.high[0] >= rates.checks_high[0]  # 0 errors in ~40 checks cannot rule out a few percent


def test_gold_images_are_certain_and_images_never_drawn_are_not_used(vendors):
    p_error, wrong, vendor, truth, _ = vendors
    everything = np.ones(len(p_error))
    rates = checked_error_rates(p_error, np.ones(len(p_error), bool), wrong, everything, vendor, 3)
    np.testing.assert_allclose(rates.rate, truth)  # every image checked with certainty: the truth exactly
    np.testing.assert_allclose(rates.checks_rate, truth)
    unplanned = checked_error_rates(p_error, np.ones(len(p_error), bool), wrong, np.zeros(len(p_error)), vendor, 3)
    assert unplanned.n_checked.sum() == 0  # checks without a known probability are not in the estimate


def test_more_checks_are_needed_for_a_narrower_interval(vendors):
    p_error, _, vendor, _, _ = vendors
    f = p_error[vendor == 1]
    none_yet = np.zeros(len(f))
    wide, narrow = checks_for_halfwidth(f, none_yet, 0.02, 0.05), checks_for_halfwidth(f, none_yet, 0.01, 0.05)
    assert 0 < wide < narrow <= len(f)
    assert wide >= 100  # under 100 planned checks the exact checks-only upper bound holds the interval up
    pi = inclusion_probabilities(f, np.zeros(len(f), int), np.array([narrow]))
    low, high = expected_interval(f, pi, 0.05)
    assert expected_halfwidth(f, pi) - 1e-12 <= (high - low) / 2 <= 0.01
    assert checks_for_halfwidth(f, pi, 0.01, 0.05) == 0  # already planned
    # a vendor the model calls perfect is not promised a narrow interval from a few checks
    sure = np.full(len(f), 0.001)
    few = inclusion_probabilities(sure, np.zeros(len(f), int), np.array([30]))
    assert expected_interval(sure, few, 0.0)[1] > 0.05


def copies_confident_mistakes(copy_share=0.01, n_per_vendor=1500, seed=1, mistaken_share=0.06):
    """Two vendors with 5% errors on random images; the second also copies the classifier's own
    confident mistakes on ``copy_share`` of its images (a vendor that pre-labels with a model like
    ours): errors the model gives a probability of error near 0, which only checks can find."""
    probs, given, true, vendor = synthetic([0.05, 0.05], n_per_vendor=n_per_vendor, seed=seed)
    k = probs.shape[1]
    rng = np.random.default_rng(seed + 100)
    mistaken = np.flatnonzero(rng.random(len(true)) < mistaken_share)
    probs[mistaken] = 0.002
    probs[mistaken, (true[mistaken] + rng.integers(1, k, len(mistaken))) % k] = 1 - 0.002 * (k - 1)
    copied = rng.choice(mistaken[vendor[mistaken] == 1], int(copy_share * n_per_vendor), replace=False)
    given[copied] = probs[copied].argmax(axis=1)
    return probs, given, true, vendor, copied


def test_the_combined_interval_covers_errors_the_model_cannot_see():
    probs, given, true, vendor, copied = copies_confident_mistakes()
    f = fit_noise_model(probs, given, vendor).p_error(given)
    assert f[copied].max() < 0.05  # the model all but rules these errors out
    wrong = given != true
    truth = np.array([wrong[vendor == v].mean() for v in range(2)])
    keys = np.arange(len(given)).astype(str)
    pi = inclusion_probabilities(f, vendor, np.array([100, 100]))
    covered = np.zeros(2)
    replicates = 200
    for r in range(replicates):
        rates = checked_error_rates(f, draw_plan(pi, keys, r), wrong, pi, vendor, 2)
        covered += (rates.low <= truth) & (truth <= rates.high)
    # 95% intervals: at least 94% of 200 draws (the Wilson interval at the effective n with the
    # residual and design variances alone covered 92% and 91% here)
    assert np.all(covered / replicates >= 0.94), covered / replicates


def _refit_jackknife(e, f, pi, f_mean, n_images):
    """The jackknife written as its definition: n separate refits of the control."""
    n = len(e)
    spread = (1 - pi) / pi ** 2
    replicates = []
    for i in range(n):
        keep = np.arange(n) != i
        offset, lam = _fit_control(e[keep], f[keep], spread[keep])
        replicates.append(offset + lam * f_mean + n / (n - 1) * ((e[keep] - offset - lam * f[keep]) / pi[keep]).sum()
                          / n_images)
    return float(np.sqrt((n - 1) / n * ((np.array(replicates) - np.mean(replicates)) ** 2).sum()))


@pytest.mark.parametrize("case", ["unequal", "flat model", "one uncertain check"])
def test_the_jackknife_in_one_pass_equals_its_refits(case):
    rng = np.random.default_rng(5)
    n = 150
    pi = {"unequal": rng.uniform(0.02, 1, n), "flat model": rng.uniform(0.02, 1, n),
          "one uncertain check": np.r_[np.ones(n - 1), 0.5]}[case]
    f = np.full(n, 0.3) if case == "flat model" else rng.random(n)
    e = (rng.random(n) < np.clip(f, 0.05, 0.9)).astype(float)
    expected = _refit_jackknife(e, f, pi, 0.25, 3000)
    assert _jackknife_se(e, f, pi, 0.25, 3000) == pytest.approx(expected, rel=1e-9, abs=1e-12)
