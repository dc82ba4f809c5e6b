"""The curated dataset with one decision per image: the labels a buyer trains on, corrected where the
evidence says so. It is derived from ``label_issues.csv`` and never changes the scorecard.

Decisions, strongest evidence first:

``corrected``         a hand check (or gold) says the given label is wrong: ``label`` is the checked
                      class (the first in taxonomy order when the checker named several).
``ambiguous``         the image shows more than one class: checked with several classes, the given one
                      among them, or the model's verdict ``ambiguous`` (plausible set: the given and
                      the suggested label). ``label`` stays the given one; ``plausible_labels`` names
                      the set.
``model_suggestion``  not checked, and the model's ``p_error`` is at least the threshold: ``label`` is
                      the model's suggestion, to be confirmed (its ``p_error`` says how sure).
``kept``              everything else: the given label stands (checked right, or no strong doubt).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ml.checks import LABEL_SEPARATOR

CORRECTION_COLUMNS = ["image_id", "vendor", "batch", "given_label", "label", "decision", "plausible_labels",
                      "basis", "evidence", "p_error", "suggested_label"]
DECISIONS = ("kept", "corrected", "ambiguous", "model_suggestion")
DEFAULT_SUGGESTION_THRESHOLD = 0.5  # p_error: more likely wrong than right


def corrected_labels(issues: pd.DataFrame, threshold: float = DEFAULT_SUGGESTION_THRESHOLD) -> pd.DataFrame:
    """One decision per image of ``label_issues.csv``.

    Parameters
    ----------
    issues : DataFrame (N, ...)
        ``label_issues.csv``: at least ``image_id, vendor, batch, given_label, suggested_label, p_error,
        verdict``; ``checked_labels`` and ``check_source`` where hand checks or gold answered.
    threshold : float
        Unchecked images whose ``p_error`` is at least this (and whose suggestion differs from the given
        label, and that are not ambiguous) get the model's suggestion.

    Returns
    -------
    DataFrame (N, 11)
        CORRECTION_COLUMNS in the order of ``issues``: ``basis`` is ``hand check``, ``gold``, ``model`` or
        "" (kept without a check and without doubt); ``evidence`` names the answer (``checks/<file> row
        N``) where one decided.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"the suggestion threshold must be in (0, 1], not {threshold}")
    given = issues["given_label"].astype(str).to_numpy()
    suggested = issues["suggested_label"].astype(str).to_numpy()
    p_error = issues["p_error"].astype(float).to_numpy()
    verdict = issues["verdict"].astype(str).to_numpy()
    checked = (issues["checked_labels"].fillna("").astype(str).to_numpy() if "checked_labels" in issues
               else np.full(len(issues), "", dtype=object))
    source = (issues["check_source"].fillna("").astype(str).to_numpy() if "check_source" in issues
              else np.full(len(issues), "", dtype=object))

    label = given.astype(object).copy()
    decision = np.full(len(issues), "kept", dtype=object)
    plausible = np.full(len(issues), "", dtype=object)
    basis = np.full(len(issues), "", dtype=object)
    for i, answer in enumerate(checked):
        if not answer:
            continue
        classes = answer.split(LABEL_SEPARATOR)
        basis[i] = "gold" if source[i].startswith("gold/") else "hand check"
        if len(classes) > 1:
            plausible[i] = answer
        if given[i] not in classes:
            decision[i], label[i] = "corrected", classes[0]
        elif len(classes) > 1:
            decision[i] = "ambiguous"
    unchecked = checked == ""
    ambiguous = unchecked & (verdict == "ambiguous")
    decision[ambiguous] = "ambiguous"
    basis[ambiguous] = "model"
    plausible[ambiguous] = [LABEL_SEPARATOR.join(dict.fromkeys([g, s])) for g, s in
                            zip(given[ambiguous], suggested[ambiguous])]
    suggest = unchecked & ~ambiguous & (p_error >= threshold) & (suggested != given)
    decision[suggest], label[suggest], basis[suggest] = "model_suggestion", suggested[suggest], "model"
    return pd.DataFrame({"image_id": issues["image_id"].to_numpy(), "vendor": issues["vendor"].to_numpy(),
                         "batch": issues["batch"].to_numpy(), "given_label": given, "label": label,
                         "decision": decision, "plausible_labels": plausible, "basis": basis,
                         "evidence": source, "p_error": p_error.round(4), "suggested_label": suggested}, columns=CORRECTION_COLUMNS)


def to_relabel(corrections: pd.DataFrame, vendor: str) -> pd.DataFrame:
    """The images of ``vendor`` whose label the evidence says is wrong (``corrected`` or
    ``model_suggestion``), most certain first: the vendor's relabelling task set."""
    mine = corrections[(corrections["vendor"] == vendor)
                       & corrections["decision"].isin(["corrected", "model_suggestion"])]
    order = np.lexsort((mine["image_id"].to_numpy(), -mine["p_error"].to_numpy(),
                        (mine["decision"] != "corrected").to_numpy()))
    return mine.iloc[order].reset_index(drop=True)
