"""Vendors labelling as several real people did: worker votes, plausible second labels, copied model mistakes.

Everything here is made by the tests (no ``../shared``): small image sets, three workers' votes, and
calibrated synthetic classifiers whose truth is known.
"""

import numpy as np
import pytest

from ml.datasets import CIFAR10_CLASSES, ImageSet, load_cifar10_workers
from ml.estimate import fit_noise_model, vendor_error_rates
from ml.issues import counted_as_error, label_verdicts
from ml.simulate import WorkerLabels, copy_confident_mistakes, label_by_workers, simulate_labels


def three_workers(n=600, k=10, split_share=0.3, seed=0):
    """An image set with three workers' votes: on ``split_share`` of the images two workers give the
    dataset's label and one another class; elsewhere all three agree."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    votes = np.repeat(labels[:, None], 3, axis=1)
    split = rng.random(n) < split_share
    other = (labels + rng.integers(1, k, n)) % k
    odd_worker = rng.integers(0, 3, n)
    votes[split, odd_worker[split]] = other[split]
    worst = np.where(split, other, labels)
    data = ImageSet("toy", rng.integers(0, 256, (n, 4, 4), dtype=np.uint8), labels, tuple(str(c) for c in range(k)))
    return data, WorkerLabels(votes, labels.copy(), worst), other, split


def test_vendors_label_as_the_workers_did_and_only_split_vendors_get_a_second_true_label():
    data, workers, other, split = three_workers()
    sim = label_by_workers(data, workers, {"orig": "original", "maj": "majority", "worst": "worst",
                                           "low": "split-minority", "high": "split-majority"}, 100, seed=1)
    original = data.labels[sim.source]
    by_vendor = {name: sim.vendor == v for v, name in enumerate(sim.vendors)}
    assert np.array_equal(sim.given[by_vendor["orig"]], original[by_vendor["orig"]])
    assert np.array_equal(sim.given[by_vendor["maj"]], original[by_vendor["maj"]])  # the majority is right here
    worst = by_vendor["worst"]
    assert np.array_equal(sim.given[worst], np.where(split, other, data.labels)[sim.source][worst])
    assert sim.wrong[worst].sum() == split[sim.source][worst].sum() > 0  # the worst vote is an error
    low = by_vendor["low"]
    on_split = low & split[sim.source]
    assert np.array_equal(sim.given[on_split], other[sim.source][on_split])  # the minority's vote ...
    assert not sim.wrong[low].any() and sim.ambiguous[on_split].all()  # ... is a plausible label, no error
    assert not sim.ambiguous[~low].any()
    with pytest.raises(ValueError, match="unknown worker label source"):
        label_by_workers(data, workers, {"x": "everyone"}, 10)


def test_worker_labels_are_matched_to_the_photos_by_source_index(tmp_path):
    photos, labels = tmp_path / "photos.npz", tmp_path / "cifar10n-human-labels.npz"
    np.savez(photos, images=np.zeros((3, 2, 2, 3), np.uint8), labels=np.array([0, 1, 2], np.int8),
             classes=np.array(CIFAR10_CLASSES), source_index=np.array([7, 3, 5]))
    rows = {"source_index": np.array([3, 5, 7, 9])}
    for name, values in {"random_label1": [1, 2, 0, 4], "random_label2": [1, 2, 6, 4], "random_label3": [8, 2, 0, 4],
                         "aggre_label": [1, 2, 0, 4], "worse_label": [8, 2, 6, 4]}.items():
        rows[name] = np.array(values)
    np.savez(labels, **rows)
    workers = load_cifar10_workers(photos)  # the labels file beside the photos by default
    np.testing.assert_array_equal(workers.votes, [[0, 6, 0], [1, 1, 8], [2, 2, 2]])
    np.testing.assert_array_equal(workers.worst, [6, 8, 2])
    np.testing.assert_array_equal(workers.split, [True, True, False])
    rows["source_index"] = np.array([3, 5, 8, 9])
    np.savez(labels, **rows)
    with pytest.raises(ValueError, match="no worker labels for 1 photos .first source_index 7"):
        load_cifar10_workers(photos, labels)


def test_copied_confident_mistakes_are_the_classifiers_surest_wrong_classes():
    data, *_ = three_workers(n=400)
    sim = simulate_labels(data, {"a": 0.0, "copy": 0.0}, 200, seed=0)
    k = len(data.classes)
    rng = np.random.default_rng(3)
    probs = np.full((400, k), 0.01)
    predicted = np.where(rng.random(400) < 0.2, (sim.true[:, 0] + 1) % k, sim.true[:, 0])
    probs[np.arange(400), predicted] = 1 - 0.01 * (k - 1) - rng.uniform(0, 0.3, 400)
    copied = copy_confident_mistakes(sim, probs, {"copy": 0.05})
    changed = copied.given != sim.given
    assert changed.sum() == 10 and (sim.vendor[changed] == 1).all()
    assert np.array_equal(copied.given[changed], predicted[changed])
    mistaken = (sim.vendor == 1) & (predicted != sim.true[:, 0])
    # the surest of the classifier's mistakes: none left unchanged is surer than one copied
    assert probs[changed].max(axis=1).min() >= probs[mistaken & ~changed].max(axis=1).max()
    with pytest.raises(ValueError, match="confident mistakes wanted"):
        copy_confident_mistakes(sim, probs, {"copy": 0.5})


def split_photos(n_per_vendor=1500, k=10, split_share=0.15, seed=0):
    """A calibrated classifier and three workers: on ``split_share`` of the images two classes are each
    plausible (the classifier gives them about 0.55 and 0.4) and the workers split two to one between
    them; elsewhere the classifier is sure and right. Vendor 0 gives the majority's label everywhere,
    vendor 1 the minority's where the workers split."""
    rng = np.random.default_rng(seed)
    n = 2 * n_per_vendor
    vendor = np.repeat([0, 1], n_per_vendor)
    majority = rng.integers(0, k, n)
    minority = (majority + rng.integers(1, k, n)) % k
    split = rng.random(n) < split_share
    probs = np.full((n, k), 0.005)
    probs[np.arange(n), majority] = 1 - 0.005 * (k - 1)
    first = rng.uniform(0.5, 0.6, n)
    probs[split] = 0.05 / (k - 2)
    probs[split, majority[split]] = first[split]
    probs[split, minority[split]] = 0.95 - first[split]
    given = np.where((vendor == 1) & split, minority, majority)
    # a class nobody would give: neither of the two plausible ones
    implausible = np.where(((majority + 1) % k == minority), (majority + 2) % k, (majority + 1) % k)
    return probs, given, vendor, split, implausible


def test_a_minority_workers_label_where_people_split_is_not_billed_as_an_error():
    probs, given, vendor, split, implausible = split_photos()
    model = fit_noise_model(probs, given, vendor)
    rates = vendor_error_rates(probs, given, vendor, model=model, counted_of=counted_as_error(), n_boot=20)
    # the issue's rule: within 1 point of the majority's vendor ...
    assert abs(rates.rate[1] - rates.rate[0]) <= 0.01, rates.rate
    verdicts = label_verdicts(model, given, np.random.default_rng(0).normal(size=(len(given), 8)))
    minority_labels = (vendor == 1) & split
    # ... and at most 10% of the minority's labels flagged as errors
    assert (verdicts["verdict"][minority_labels] == "error").mean() <= 0.10
    # a class that neither worker gave, on the same images, is billed
    wrong = np.where(minority_labels, implausible, given)
    billed = vendor_error_rates(probs, wrong, vendor, counted_of=counted_as_error(), n_boot=20)
    assert billed.rate[1] - billed.rate[0] > 0.10, billed.rate


def test_the_labels_h_bills_its_worst_vendor_for_are_the_labels_hp_must_not_bill():
    """On the same photos, H's worst vendor and HP's minority vendor give the same label wherever the
    workers' majority is right; where the majority is wrong the worst vendor gives that wrong majority
    and the minority vendor the dataset's own label."""
    from bench.workers import billed_in_h_and_plausible_in_hp

    data, workers, other, split = three_workers(n=2000, split_share=0.4, seed=3)
    rng = np.random.default_rng(4)
    majority_wrong = split & (rng.random(len(split)) < 0.25)  # two workers give the other class, one the truth
    votes = np.where(majority_wrong[:, None], other[:, None], workers.votes)
    votes[majority_wrong, rng.integers(0, 3, len(split))[majority_wrong]] = data.labels[majority_wrong]
    majority = np.where(majority_wrong, other, data.labels)
    workers = WorkerLabels(votes, majority, np.where(split, other, data.labels))
    figures = billed_in_h_and_plausible_in_hp(data, workers, seed=5)
    assert figures["split"] == pytest.approx(split.mean())
    assert figures["worst_errors_on_split"] == 1.0
    # every split photo is an error of the worst vendor; the minority vendor gives it where the majority is right
    assert figures["worst_errors_given_by_minority"] == pytest.approx(1 - majority_wrong.sum() / split.sum())
