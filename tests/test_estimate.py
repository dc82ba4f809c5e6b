"""The noise model on probabilities whose truth is known: calibrated synthetic classifiers."""

import numpy as np
import pandas as pd

from ml.audit import ISSUE_COLUMNS, run_audit
import ml.estimate
from ml.estimate import (apply_temperature, confusion_shaped_targets, fit_noise_model, fit_temperature,
                         hard_image_weights, inject_flips, vendor_error_rates)
from ml.issues import cleanlab_baseline, outlier_scores
from ml.scorecard import COMPARISON_COLUMNS, SCORECARD_COLUMNS, build_scorecard, compare_vendors


def synthetic(rates, n_per_vendor=1500, k=10, seed=0, strength=4.5):
    """A calibrated classifier (about 85% accurate; less with a lower ``strength``, the mean boost of
    its favoured class's logit) and vendors with uniform label noise.

    The classifier sees the vendors' noisy labels, so its outputs mix in their mean noise.
    """
    rng = np.random.default_rng(seed)
    vendor = np.repeat(np.arange(len(rates)), n_per_vendor)
    n = len(vendor)
    favoured = rng.integers(0, k, n)
    logits = rng.normal(0, 1.0, (n, k))
    logits[np.arange(n), favoured] += rng.normal(strength, 1.5, n)
    clean = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # calibrated by construction: the true class is drawn from the classifier's own probabilities
    true = (rng.random((n, 1)) > clean.cumsum(axis=1)).sum(axis=1).clip(max=k - 1)
    given = true.copy()
    for v, rate in enumerate(rates):
        members = np.flatnonzero(vendor == v)
        wrong = rng.choice(members, int(round(rate * len(members))), replace=False)
        given[wrong] = (true[wrong] + rng.integers(1, k, len(wrong))) % k
    mean_noise = np.mean(rates)
    noisy = clean * (1 - mean_noise) + (1 - clean) * mean_noise / (k - 1)
    return noisy, given, true, vendor


def confidently_mistaken(rates, share=0.04, seed=0):
    """:func:`synthetic`, but on a ``share`` of the images the classifier is sure of a wrong class (it
    leaves the true one 0.2%): mistakes of its own, alike for every vendor's images."""
    probs, given, true, vendor = synthetic(rates, seed=seed)
    k = probs.shape[1]
    rng = np.random.default_rng(seed + 100)
    mistaken = np.flatnonzero(rng.random(len(true)) < share)
    probs[mistaken] = 0.002
    probs[mistaken, (true[mistaken] + rng.integers(1, k, len(mistaken))) % k] = 1 - 0.002 * (k - 1)
    return probs, given, true, vendor


def pair_confused(rates, n_per_vendor=1500, k=10, seed=0):
    """A calibrated classifier that often hesitates between the two classes of a pair (2j, 2j+1), and
    vendors whose errors swap a pair's classes: errors the classifier finds plausible."""
    rng = np.random.default_rng(seed)
    vendor = np.repeat(np.arange(len(rates)), n_per_vendor)
    n = len(vendor)
    logits = rng.normal(0, 1.0, (n, k))
    logits[np.arange(n), rng.integers(0, k, n)] += rng.normal(4.5, 1.5, n)
    clean = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    partner = np.arange(k) ^ 1
    hesitation = rng.uniform(0, 0.4, (n, 1))
    clean = (1 - hesitation) * clean + hesitation * clean[:, partner]
    true = (rng.random((n, 1)) > clean.cumsum(axis=1)).sum(axis=1).clip(max=k - 1)
    given = true.copy()
    for v, rate in enumerate(rates):
        wrong = rng.choice(np.flatnonzero(vendor == v), int(round(rate * n_per_vendor)), replace=False)
        given[wrong] = partner[true[wrong]]
    mean_noise = np.mean(rates)
    return (1 - mean_noise) * clean + mean_noise * clean[:, partner], given, true, vendor


def test_temperature_undoes_a_known_sharpening():
    probs, given, *_ = synthetic([0.0])
    assert abs(fit_temperature(probs, given) - 1.0) < 0.1  # calibrated already
    assert abs(fit_temperature(apply_temperature(probs, 0.5), given) - 2.0) < 0.2


def test_noise_model_recovers_vendor_rates_where_cleanlab_overstates():
    rates = [0.0, 0.05, 0.2]
    probs, given, true, vendor = synthetic(rates)
    model = fit_noise_model(probs, given, vendor)
    p_error = model.p_error(given)
    estimate = np.array([p_error[vendor == v].mean() for v in range(3)])
    truth = np.array([(given != true)[vendor == v].mean() for v in range(3)])
    assert np.all(np.abs(estimate - truth) < 0.02), estimate
    baseline, _ = cleanlab_baseline(probs, given, vendor)
    assert np.abs(estimate - truth).mean() < np.abs(baseline - truth).mean()
    # the posterior ranks real errors first
    wrong = given != true
    assert p_error[wrong].mean() > 0.6 > 0.1 > p_error[~wrong].mean()


def test_injected_flips_measure_how_much_of_a_real_error_the_estimator_counts():
    probs, given, true, vendor = synthetic([0.0, 0.1, 0.2])
    model = fit_noise_model(probs, given, vendor)
    injected = inject_flips(probs, given, vendor, model, repeats=4).sensitivity()
    p_error = model.p_error(given)
    for v in (1, 2):  # vendors with real errors: the injected flips stand in for them
        real = p_error[(vendor == v) & (given != true)].mean()
        # the flips add to the vendor's noise, which loosens its confusion: a little above, never below
        assert -0.02 < injected[v] - real < 0.1, (v, injected[v], real)
    assert np.all((0.3 < injected) & (injected < 1.0))


def test_sensitivity_correction_keeps_rates_on_the_truth_with_covering_intervals():
    probs, given, true, vendor = synthetic([0.0, 0.05, 0.2])
    result = vendor_error_rates(probs, given, vendor, n_boot=40)
    truth = np.array([(given != true)[vendor == v].mean() for v in range(3)])
    assert np.all(np.abs(result.rate - truth) < 0.02), (result.rate, truth)
    assert np.all((result.low <= truth) & (truth <= result.high)), (result.low, result.high, truth)
    # the line raw = f + (s - f) * rate that the correction inverts
    np.testing.assert_allclose(result.raw, result.false_positive + (result.sensitivity - result.false_positive)
                               * result.rate, atol=1e-9)


def test_the_classifiers_own_confident_mistakes_are_allowed_for_at_the_low_end():
    rates = [0.0, 0.05, 0.2]
    probs, given, true, vendor = confidently_mistaken(rates)
    result = vendor_error_rates(probs, given, vendor, n_boot=40)
    truth = np.array([(given != true)[vendor == v].mean() for v in range(3)])
    # the mistakes read as errors of every vendor: each estimate is several points high ...
    assert np.all(result.rate - truth > 0.02), (result.rate, truth)
    # ... the data cannot tell, so each low end allows for them: the best vendor's reaches 0
    assert result.low[0] == 0.0
    assert np.all((result.low <= truth) & (truth <= result.high)), (result.low, result.high, truth)
    # the point estimate is still the measured line's, and a share common to all cancels in a comparison
    np.testing.assert_allclose(result.raw, result.false_positive + (result.sensitivity - result.false_positive)
                               * result.rate, atol=1e-9)
    by_pair = {(r.vendor_a, r.vendor_b): r for r in compare_vendors(["a", "b", "c"], result).itertuples()}
    assert by_pair[("a", "c")].conclusion == "a has fewer errors than c"


def test_confusion_shaped_flips_go_where_the_vendors_errors_go_and_are_harder_to_see():
    k = 5
    confusion = np.stack([0.8 * np.eye(k) + 0.2 * np.roll(np.eye(k), 1, axis=1),  # errors go to the next class
                          0.8 * np.eye(k) + 0.05 * (1 - np.eye(k))])  # anywhere
    given = np.tile(np.arange(k), 2000)
    vendor = np.repeat([0, 1], len(given) // 2)
    target = confusion_shaped_targets(confusion, vendor, given, np.random.default_rng(0).random(len(given)))
    assert np.array_equal(target[vendor == 0], (given[vendor == 0] + 1) % k)
    assert not np.any(target == given)
    shares = np.bincount((target - given)[vendor == 1] % k, minlength=k)[1:] / (vendor == 1).sum()
    assert np.all(np.abs(shares - 1 / (k - 1)) < 0.02), shares

    # vendors that swap classes the classifier hesitates between: their errors are harder to see than
    # flips to any class, and the flips shaped like their confusion say so
    probs, given, true, vendor = pair_confused([0.0, 0.1, 0.25])
    model = fit_noise_model(probs, given, vendor)
    anywhere = inject_flips(probs, given, vendor, model, repeats=4).sensitivity()
    shaped = inject_flips(probs, given, vendor, model, repeats=4, like_confusion=True).sensitivity()
    real = np.array([model.p_error(given)[(vendor == v) & (given != true)].mean() for v in (1, 2)])
    assert np.all(shaped[1:] < anywhere[1:] - 0.05) and np.all(real < shaped[1:]), (anywhere, shaped, real)
    result = vendor_error_rates(probs, given, vendor, model=model, n_boot=40)
    truth = np.array([(given != true)[vendor == v].mean() for v in range(3)])
    assert np.all((result.low <= truth) & (truth <= result.high)), (result.low, result.high, truth)


def errors_on_hard_images(rates, n_per_vendor=1200, k=10, seed=0, power=2.0):
    """:func:`synthetic`'s calibrated classifier, but each vendor errs on images with a chance growing
    as ``(1 - the classifier's top probability) ** power``: like people, on the images it is unsure of."""
    clean, _, true, vendor = synthetic([0.0] * len(rates), n_per_vendor, k, seed)
    rng = np.random.default_rng(seed + 7)
    doubt = (1 - clean.max(axis=1)) ** power
    given = true.copy()
    for v, rate in enumerate(rates):
        members = np.flatnonzero(vendor == v)
        wrong = rng.choice(members, int(round(rate * len(members))), replace=False,
                           p=doubt[members] / doubt[members].sum())
        given[wrong] = (true[wrong] + rng.integers(1, k, len(wrong))) % k
    mean_noise = np.mean(rates)
    return clean * (1 - mean_noise) + (1 - clean) * mean_noise / (k - 1), given, true, vendor


def test_errors_on_hard_images_are_less_visible_and_the_interval_allows_for_them(monkeypatch):
    rates = [0.0, 0.1, 0.2, 0.3]
    probs, given, true, vendor = errors_on_hard_images(rates)
    truth = np.array([(given != true)[vendor == v].mean() for v in range(4)])
    model = fit_noise_model(probs, given, vendor)
    # flips drawn where the classifier is unsure are harder to see than flips on random images, as
    # the vendors' real errors are
    anywhere = inject_flips(probs, given, vendor, model, repeats=4).sensitivity()
    hard = inject_flips(probs, given, vendor, model, repeats=4, hardness=2.0).sensitivity()
    real = np.array([model.p_error(given)[(vendor == v) & (given != true)].mean() for v in (1, 2, 3)])
    assert np.all(hard[1:] < anywhere[1:] - 0.1) and np.all(real < anywhere[1:] - 0.1), (anywhere, hard, real)
    weights = hard_image_weights(model.clean_prior, vendor, 2.0)
    np.testing.assert_allclose(np.bincount(vendor, weights=weights) / np.bincount(vendor), 1.0)

    result = vendor_error_rates(probs, given, vendor, model=model, n_boot=30)
    # the point estimate reads them low, as flips on random images would have it ...
    assert np.all(result.rate[1:] < truth[1:] - 0.03), (result.rate, truth)
    # ... and the interval's high end allows for errors this hard to see
    assert np.all((result.low <= truth) & (truth <= result.high)), (result.low, result.high, truth)
    # without that allowance, the intervals of the vendors that err most miss
    monkeypatch.setattr(ml.estimate, "HARD_ERRORS_HARDNESS", 0.0)
    uniform_only = vendor_error_rates(probs, given, vendor, model=model, n_boot=30)
    assert np.all(uniform_only.high[2:] < truth[2:]), (uniform_only.high, truth)


def test_intervals_cover_and_pairwise_tests_separate_distinct_vendors():
    rates = [0.0, 0.1, 0.11]
    probs, given, true, vendor = synthetic(rates, seed=2)
    result = vendor_error_rates(probs, given, vendor, n_boot=60)
    truth = np.array([(given != true)[vendor == v].mean() for v in range(3)])
    assert np.all(result.low <= result.rate) and np.all(result.rate <= result.high)
    assert np.sum((result.low <= truth + 0.01) & (truth - 0.01 <= result.high)) >= 2
    comparisons = compare_vendors(["a", "b", "c"], result)
    by_pair = {(r.vendor_a, r.vendor_b): r for r in comparisons.itertuples()}
    assert by_pair[("a", "b")].conclusion == "a has fewer errors than b" and by_pair[("a", "b")].p_value < 0.05
    assert by_pair[("b", "c")].conclusion == "not distinguishable with this data"


def test_scorecard_and_issue_tables_follow_the_contract():
    probs, given, true, vendor = synthetic([0.0, 0.2], n_per_vendor=400)
    classes = tuple(f"c{i}" for i in range(10))
    rows = pd.DataFrame({"image_id": [f"v{v}/b/{i}.png" for i, v in enumerate(vendor)],
                         "vendor": [f"v{v}" for v in vendor], "batch": "b",
                         "label": [classes[g] for g in given]})
    embeddings = np.random.default_rng(0).normal(size=(len(given), 16))
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    result, issues = run_audit(rows, probs, embeddings, classes, n_boot=20)
    assert list(issues.columns) == ISSUE_COLUMNS + ["cleanlab_flag"]
    assert issues["cleanlab_flag"].dtype == bool and len(result.baseline_rates) == 2
    assert set(issues["verdict"]) <= {"ok", "error", "ambiguous", "outlier"}
    card = build_scorecard(result.vendors, np.repeat([0, 1], 400), issues["verdict"].to_numpy(), result.rates)
    assert list(card.columns) == SCORECARD_COLUMNS + ["status", "note", "ambiguous_rate", "basis"]
    assert card["status"].tolist() == ["rated", "rated"]
    assert card["vendor"].tolist() == ["v0", "v1"] and card["rank"].tolist() == [1, 2]
    assert card.loc[1, "n_flagged"] > card.loc[0, "n_flagged"]


def test_outlier_scores_against_a_reference_sample_find_the_odd_images():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 32))
    embeddings = centres[rng.integers(0, 10, 6000)] + 0.3 * rng.normal(size=(6000, 32))
    odd = rng.choice(6000, 5, replace=False)
    embeddings[odd] = rng.normal(size=(5, 32)) * 3  # far from every cluster
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    sampled = outlier_scores(embeddings, reference_size=1000)
    assert set(np.argsort(sampled)[:5]) == set(odd)
    # small collections compare with every other image, never with themselves
    small = embeddings[:300]
    everyone = small @ small.T
    np.fill_diagonal(everyone, -np.inf)
    expected = np.sort(everyone, axis=1)[:, -10:].mean(axis=1)
    np.testing.assert_allclose(outlier_scores(small), expected, rtol=1e-5)
    # the sample excludes each image from its own neighbours too
    assert np.all(sampled < 0.999)


def test_a_vendor_scored_after_training_moves_no_other_vendor():
    """Images the classifier did not train on (a new vendor) change neither the calibration nor the
    noise mixture, and the injected flips and bootstrap draws are keyed per image and per vendor."""
    probs, given, true, vendor = synthetic([0.0, 0.05, 0.2, 0.1], n_per_vendor=800, seed=3)
    keys = np.array([f"content-{i}" for i in range(len(given))])
    first = vendor < 3
    before = vendor_error_rates(probs[first], given[first], vendor[first], n_boot=30, vendor_names=["a", "b", "c"],
                                draw_keys=keys[first])
    after = vendor_error_rates(probs, given, vendor, n_boot=30, vendor_names=["a", "b", "c", "late"], draw_keys=keys,
                               trained=first)
    # equal up to EM's stopping tolerance (1e-5 on the posteriors)
    np.testing.assert_allclose(after.rate[:3], before.rate, atol=1e-4)
    np.testing.assert_allclose(after.low[:3], before.low, atol=1e-4)
    np.testing.assert_allclose(after.high[:3], before.high, atol=1e-4)


def test_an_identical_copy_gets_the_same_rate_and_no_significant_difference():
    probs, given, true, vendor = synthetic([0.0, 0.05, 0.2], n_per_vendor=800, seed=4)
    keys = np.array([f"content-{i}" for i in range(len(given))])
    copy = vendor == 2  # vendor c delivered again, byte for byte, under another name after training
    all_probs = np.concatenate([probs, probs[copy]])
    all_given = np.concatenate([given, given[copy]])
    all_vendor = np.concatenate([vendor, np.full(copy.sum(), 3)])
    all_keys = np.concatenate([keys, keys[copy]])
    trained = np.arange(len(all_given)) < len(given)
    result = vendor_error_rates(all_probs, all_given, all_vendor, n_boot=60, vendor_names=["a", "b", "c", "c2"],
                                draw_keys=all_keys, trained=trained)
    assert abs(result.rate[3] - result.rate[2]) < 1e-9
    comparisons = compare_vendors(["a", "b", "c", "c2"], result, min_images=200)
    pair = comparisons[(comparisons["vendor_a"] == "c") & (comparisons["vendor_b"] == "c2")].iloc[0]
    assert pair["conclusion"] == "not distinguishable with this data" and pair["p_holm"] > 0.5


def test_a_single_vendor_has_an_empty_comparison_table():
    probs, given, true, vendor = synthetic([0.05], n_per_vendor=400)
    result = vendor_error_rates(probs, given, vendor, n_boot=50, vendor_names=["only"])
    comparisons = compare_vendors(["only"], result)  # the first delivery of a new home: nothing to compare
    assert comparisons.empty and list(comparisons.columns) == COMPARISON_COLUMNS
    assert comparisons["p_value"].dtype == float and comparisons["difference"].dtype == float


def test_a_lone_vendor_is_bounded_from_above_only_and_says_so(tmp_path):
    from ml.audit import load_audit, run_audit
    from ml.scorecard import rate_table

    probs, given, true, vendor = synthetic([0.0], n_per_vendor=1500, seed=3)
    lone = vendor_error_rates(probs, given, vendor, n_boot=50, vendor_names=["only"])
    assert lone.upper_only.tolist() == [True] and lone.low[0] == 0.0 and lone.high[0] > lone.rate[0]
    table = rate_table(["only"], vendor, np.full(len(given), "ok"), lone)
    assert "upper estimate" in table.loc[0, "note"] and table.loc[0, "error_rate_low"] == 0.0
    # a second vendor's labels in the training: both are bounded both ways again
    probs2, given2, _, vendor2 = synthetic([0.0, 0.2], n_per_vendor=800, seed=3)
    assert not vendor_error_rates(probs2, given2, vendor2, n_boot=50).upper_only.any()
    # the flag survives the saved audit; audits saved before it read as bounded both ways
    classes = tuple(f"c{i}" for i in range(10))
    rows = pd.DataFrame({"image_id": [f"only/b/{i}.png" for i in range(len(given))], "vendor": "only", "batch": "b",
                         "label": [classes[g] for g in given]})
    result, _ = run_audit(rows, probs, np.random.default_rng(0).normal(size=(len(given), 8)), classes, n_boot=50)
    (tmp_path / "audit.npz").write_bytes(result.to_npz())
    assert load_audit(tmp_path / "audit.npz").rates.upper_only.tolist() == [True]
    with np.load(tmp_path / "audit.npz") as saved:
        np.savez(tmp_path / "old.npz", **{k: saved[k] for k in saved.files if k != "upper_only"})
    assert load_audit(tmp_path / "old.npz").rates.upper_only.tolist() == [False]


def test_small_vendors_get_exact_intervals_and_take_part_in_no_claim():
    probs, given, true, vendor = synthetic([0.0, 0.2, 0.0, 0.0], n_per_vendor=1000, seed=5)
    keep = np.concatenate([np.flatnonzero(vendor == 0), np.flatnonzero(vendor == 1),
                           np.flatnonzero(vendor == 2)[:100], np.flatnonzero(vendor == 3)[:3]])
    probs, given, true, vendor = probs[keep], given[keep], true[keep], vendor[keep]
    result = vendor_error_rates(probs, given, vendor, n_boot=60, vendor_names=["a", "c", "small", "tiny"])
    # no interval is narrower than the exact binomial one for the vendor's image count
    assert result.high[3] >= 0.70 and result.low[3] == 0.0  # 0 errors in 3 images: up to 70.8%
    assert result.high[2] >= 0.036  # 0 errors in 100 images: up to 3.6%
    assert result.rate[3] < 0.5  # the pooled sensitivity keeps three correct labels from reading as errors
    card = build_scorecard(["a", "c", "small", "tiny"], vendor, np.full(len(vendor), "ok"), result)
    by_vendor = card.set_index("vendor")
    assert by_vendor.loc["small", "status"] == "too few images to rate" and pd.isna(by_vendor.loc["small", "rank"])
    assert "100 < 200" in by_vendor.loc["small", "note"]
    assert by_vendor.loc["a", "rank"] == 1 and by_vendor.loc["c", "rank"] == 2
    assert card["vendor"].tolist()[-2:] == ["small", "tiny"]  # unrated vendors after the ranked ones
    comparisons = compare_vendors(["a", "c", "small", "tiny"], result)
    assert (comparisons["difference_low"] >= -1).all() and (comparisons["difference_high"] <= 1).all()
    untested = comparisons[(comparisons["vendor_a"].isin(["small", "tiny"])) | (comparisons["vendor_b"].isin(["small", "tiny"]))]
    assert untested["p_value"].isna().all() and untested["conclusion"].str.startswith("not compared").all()
    tested = comparisons.dropna(subset=["p_value"])
    assert tested[["vendor_a", "vendor_b"]].values.tolist() == [["a", "c"]]
    assert tested["conclusion"].iloc[0] == "a has fewer errors than c" and tested["p_text"].iloc[0] == "< 0.001"


def test_holm_adjustment_and_p_value_resolution():
    from ml.scorecard import format_p_value, holm

    np.testing.assert_allclose(holm(np.array([0.01, 0.04, 0.03, 0.5])), [0.04, 0.09, 0.09, 0.5])
    assert holm(np.array([0.2, 0.9])).tolist() == [0.4, 0.9]
    assert format_p_value(1e-7) == "< 0.001" and format_p_value(0.0123) == "0.012" and format_p_value(0.5) == "0.50"


def test_annotators_are_rated_within_their_vendor_and_small_teams_are_not_ranked():
    # vendor 0: one careful and one careless annotator; vendor 1: one annotator, and 50 unnamed rows
    probs, given, true, vendor = synthetic([0.0, 0.0, 0.05], n_per_vendor=800)
    vendor = (vendor == 2).astype(np.int64)  # the first 1,600 images are vendor 0's
    annotator = np.where(np.arange(len(given)) < 800, "careful", "careless").astype(object)
    careless = np.flatnonzero(annotator == "careless")
    careless = careless[vendor[careless] == 0]
    flipped = careless[: len(careless) // 5]  # 20% of the careless annotator's labels are wrong
    given[flipped] = (true[flipped] + 1) % 10
    annotator[vendor == 1] = "solo"
    annotator[np.flatnonzero(vendor == 1)[:50]] = ""
    classes = tuple(f"c{i}" for i in range(10))
    rows = pd.DataFrame({"image_id": [f"img{i}" for i in range(len(given))], "vendor": [f"v{v}" for v in vendor],
                         "batch": "b1", "label": [classes[g] for g in given], "annotator": annotator})
    embeddings = np.random.default_rng(0).normal(size=(len(given), 16))
    result, _ = run_audit(rows, probs, embeddings, classes, n_boot=20)
    table = result.annotators.set_index(["vendor", "annotator"])
    assert sorted(table.index) == [("v0", "careful"), ("v0", "careless"), ("v1", "(unnamed)"), ("v1", "solo")]
    assert table.loc[("v0", "careless"), "error_rate"] > table.loc[("v0", "careful"), "error_rate"] + 0.1
    assert table.loc[("v1", "(unnamed)"), "status"] == "too few images to rate"
    assert pd.isna(table.loc[("v1", "(unnamed)"), "rank"])
    # one annotator per vendor: no table, it would repeat the scorecard
    rows["annotator"] = rows["vendor"] + "-team"
    assert run_audit(rows, probs, embeddings, classes, n_boot=20)[0].annotators is None


def test_em_in_blocks_of_rows_fits_what_one_pass_over_all_rows_fits(monkeypatch):
    probs, given, _, vendor = synthetic([0.0, 0.05, 0.2], n_per_vendor=3000, seed=4)
    monkeypatch.setattr(ml.estimate, "EM_BLOCK_ROWS", len(given))  # one block: every pass over every row
    whole = fit_noise_model(probs, given, vendor)
    monkeypatch.setattr(ml.estimate, "EM_BLOCK_ROWS", 2048)  # five blocks, the last one short
    blocked = fit_noise_model(probs, given, vendor)
    assert blocked.iterations == whole.iterations
    np.testing.assert_allclose(blocked.confusion, whole.confusion, atol=1e-10)
    np.testing.assert_allclose(blocked.posterior, whole.posterior, atol=1e-9)
