"""Figures that rest on a weak classifier say so: which rates are unreliable, why, and what would help."""

import numpy as np
import pandas as pd
from test_estimate import synthetic

from ml.audit import load_audit, run_audit
from ml.reliability import (
    MIN_CHANCE_ADJUSTED_ACCURACY, UNRELIABLE, assess_reliability, min_heldout_accuracy, reliability_lines,
    what_would_help,
)
from ml.scorecard import build_scorecard

CLASSES = tuple(f"c{i}" for i in range(10))


def _audit(strength: float, seed: int = 0):
    probs, given, _, vendor = synthetic([0.05, 0.10], n_per_vendor=400, seed=seed, strength=strength)
    rows = pd.DataFrame({"image_id": [f"v{v}/b/{i}.png" for i, v in enumerate(vendor)],
                         "vendor": [f"v{v}" for v in vendor], "batch": "b", "label": [CLASSES[g] for g in given]})
    embeddings = np.random.default_rng(seed).normal(size=(len(given), 8))
    result, issues = run_audit(rows, probs, embeddings, CLASSES, n_boot=50)
    return result, issues, vendor, (probs.argmax(axis=1) == given).mean()


def test_a_weak_classifier_makes_every_rate_unreliable_and_says_why_and_what_would_help(tmp_path):
    result, issues, vendor, accuracy = _audit(strength=1.0)
    assert result.heldout_accuracy == accuracy < min_heldout_accuracy(10)
    reliability = assess_reliability(result.rates, result.heldout_accuracy, len(CLASSES))
    assert reliability.weak_classifier and reliability.unreliable.tolist() == [True, True]
    remedies = what_would_help("small_cnn", 140)
    card = build_scorecard(result.vendors, vendor, issues["verdict"].to_numpy(), result.rates,
                           reliability=reliability, remedies=remedies)
    for row in card.itertuples():
        slope = result.rates.sensitivity[row.Index] - result.rates.false_positive[row.Index]
        assert row.note.startswith(UNRELIABLE), row.note
        assert f"{100 * accuracy:.1f}% accuracy on its own held-out folds" in row.note
        assert f"detection slope {slope:.2f}" in row.note
        assert "more images per vendor" in row.note and "backbone: efficientnet_lite0" in row.note
        assert "vendor-audit plan --budget 140" in row.note
    lines = reliability_lines(reliability, result.vendors, remedies)
    assert lines[0].startswith("The error rates of every vendor are unreliable")
    assert f"{100 * accuracy:.1f}% accuracy" in lines[1] and "What would help" in lines[-1]
    # a home on a pretrained backbone is not told to use one; the accuracy survives the saved audit
    assert not any("backbone" in r for r in what_would_help("efficientnet_lite0", 140))
    (tmp_path / "audit.npz").write_bytes(result.to_npz())
    assert load_audit(tmp_path / "audit.npz").heldout_accuracy == result.heldout_accuracy


def test_a_good_classifier_raises_no_alarm_and_hand_checks_make_a_rate_reliable():
    result, issues, vendor, accuracy = _audit(strength=4.5)
    assert accuracy > min_heldout_accuracy(10)
    reliability = assess_reliability(result.rates, result.heldout_accuracy, len(CLASSES))
    assert not reliability.unreliable.any()
    assert reliability_lines(reliability, result.vendors, what_would_help("small_cnn", 140)) == []
    card = build_scorecard(result.vendors, vendor, issues["verdict"].to_numpy(), result.rates,
                           reliability=reliability)
    assert (card["note"] == "").all()
    weak, _, _, _ = _audit(strength=1.0)
    checked = assess_reliability(weak.rates, weak.heldout_accuracy, len(CLASSES), combined=np.array([True, False]))
    assert checked.unreliable.tolist() == [False, True]


def test_the_accuracy_needed_is_relative_to_the_number_of_classes():
    assert abs(min_heldout_accuracy(10) - (0.1 + MIN_CHANCE_ADJUSTED_ACCURACY * 0.9)) < 1e-12
    assert min_heldout_accuracy(2) > min_heldout_accuracy(10) > 0.66  # a user's 66% on 10 classes is weak


def test_a_weakly_trained_home_says_so_in_the_scorecard_the_summary_and_the_report(tmp_path, capsys):
    from conftest import make_home
    from pipelines.cli import main

    # one epoch of one head on 2 x 200 digits: a classifier well under the accuracy needed
    home = make_home(tmp_path / "home", {"a": 0.05, "b": 0.10}, per_vendor=200, epochs=1, batch_size=64,
                     heads=("softmax",))
    assert main(["run", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    card = pd.read_csv(home / "reports" / "scorecard.csv", dtype=str, keep_default_na=False)
    assert all(note.startswith(UNRELIABLE) for note in card["note"]), card["note"].tolist()
    assert all("accuracy on its own held-out folds" in note and "detection slope" in note for note in card["note"])
    summary = out.split("\nsummary:\n", 1)[1].splitlines()
    assert summary[0].startswith("  the error rates of a, b are UNRELIABLE")
    assert any(line.startswith("    vendor a: " + UNRELIABLE) and "vendor-audit plan --budget" in line
               and "backbone: efficientnet_lite0" in line for line in summary)
    report = (home / "reports" / "report.md").read_text()
    first_lines = report.split("## Summary")[0]
    assert "**The error rates of every vendor are unreliable" in first_lines
    assert "accuracy on its own held-out folds" in first_lines and "What would help" in first_lines


def test_a_well_trained_home_raises_no_alarm(audited_home):
    card = pd.read_csv(audited_home / "reports" / "scorecard.csv", dtype=str, keep_default_na=False)
    assert not any(UNRELIABLE in note for note in card["note"])
    assert "unreliable" not in (audited_home / "reports" / "report.md").read_text().split("## Summary")[0]
