"""The corrected dataset: one decision per image from label_issues.csv and the hand checks."""

import pandas as pd
import pytest

from ml.corrections import CORRECTION_COLUMNS, corrected_labels, to_relabel


def _issues() -> pd.DataFrame:
    rows = [  # image_id, vendor, given, suggested, p_error, verdict, checked_labels, check_source
        ("i1", "a", "cat", "cat", 0.02, "ok", "", ""),                            # kept, no doubt
        ("i2", "a", "cat", "dog", 0.91, "error", "", ""),                         # model suggestion
        ("i3", "a", "cat", "dog", 0.40, "ok", "", ""),                            # below the threshold: kept
        ("i4", "b", "cat", "dog", 0.35, "ambiguous", "", ""),                     # ambiguous by the model
        ("i5", "b", "cat", "cat", 0.05, "error", "dog", "checks/demo.csv row 3"),  # corrected by a check
        ("i6", "b", "dog", "cat", 0.97, "ok", "dog", "checks/demo.csv row 4"),     # checked right: kept
        ("i7", "b", "cat", "dog", 0.60, "ambiguous", "cat|dog", "gold/g.csv row 1"),  # checked: two classes
        ("i8", "b", "bird", "cat", 0.88, "error", "cat|dog", "checks/demo.csv row 5"),  # wrong, two classes
    ]
    return pd.DataFrame(rows, columns=["image_id", "vendor", "given_label", "suggested_label", "p_error", "verdict",
                                       "checked_labels", "check_source"]).assign(batch="batch-001")


def test_each_image_gets_the_decision_its_strongest_evidence_supports():
    labels = corrected_labels(_issues()).set_index("image_id")
    assert list(labels.reset_index().columns) == CORRECTION_COLUMNS
    assert labels["decision"].to_dict() == {
        "i1": "kept", "i2": "model_suggestion", "i3": "kept", "i4": "ambiguous", "i5": "corrected", "i6": "kept",
        "i7": "ambiguous", "i8": "corrected"}
    assert labels["label"].to_dict() == {
        "i1": "cat", "i2": "dog", "i3": "cat", "i4": "cat", "i5": "dog", "i6": "dog", "i7": "cat", "i8": "cat"}
    assert labels["basis"].to_dict() == {
        "i1": "", "i2": "model", "i3": "", "i4": "model", "i5": "hand check", "i6": "hand check", "i7": "gold",
        "i8": "hand check"}
    assert labels.loc["i4", "plausible_labels"] == "cat|dog" and labels.loc["i7", "plausible_labels"] == "cat|dog"
    assert labels.loc["i5", "evidence"] == "checks/demo.csv row 3" and labels.loc["i2", "evidence"] == ""
    # a check overrides the model both ways: i6's model doubt is answered, i5's model confidence corrected
    assert labels.loc["i6", "label"] == "dog" and labels.loc["i5", "label"] == "dog"


def test_the_threshold_moves_only_unchecked_unambiguous_images():
    strict = corrected_labels(_issues(), threshold=0.95).set_index("image_id")["decision"]
    loose = corrected_labels(_issues(), threshold=0.3).set_index("image_id")["decision"]
    assert strict["i2"] == "kept" and loose["i3"] == "model_suggestion"
    assert strict["i4"] == loose["i4"] == "ambiguous" and strict["i5"] == loose["i5"] == "corrected"
    with pytest.raises(ValueError, match="threshold"):
        corrected_labels(_issues(), threshold=0)


def test_a_vendor_relabels_its_checked_errors_first_then_the_most_certain_suggestions():
    labels = corrected_labels(_issues(), threshold=0.3)
    assert to_relabel(labels, "a")["image_id"].tolist() == ["i2", "i3"]
    assert to_relabel(labels, "b")["image_id"].tolist() == ["i8", "i5"]  # both checked: higher p_error first
