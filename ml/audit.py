"""The whole estimate from out-of-sample outputs: noise model, per-image verdicts, per-vendor and
per-annotator rates."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ml.estimate import NoiseModel, VendorRates, fit_noise_model, vendor_error_rates
from ml.issues import VerdictRules, cleanlab_baseline, counted_as_error, label_verdicts
from ml.reliability import assess_reliability, heldout_accuracy
from ml.scorecard import rate_table

ISSUE_COLUMNS = ["image_id", "vendor", "batch", "given_label", "suggested_label", "p_error", "verdict"]
ANNOTATOR_SEPARATOR = "/"  # annotators are rated as "<vendor>/<annotator>" groups, nested in their vendor


@dataclass
class AuditResult:
    vendors: list[str]
    model: NoiseModel
    verdicts: dict[str, np.ndarray]
    rates: VendorRates
    baseline_rates: np.ndarray  # (V,) cleanlab's num_label_issues share per vendor, on the same probabilities
    annotators: pd.DataFrame | None = None  # rate_table per (vendor, annotator); None unless a vendor names several
    heldout_accuracy: float = float("nan")  # the classifier's, on its own held-out folds against the given labels
    deliveries: GroupRates | None = None  # the same estimator per delivery (vendor/batch)

    def to_npz(self) -> bytes:
        buffer = io.BytesIO()
        r = self.rates
        np.savez(buffer, vendors=np.array(self.vendors), confusion=self.model.confusion,
                 temperature=self.model.temperature, rate=r.rate, low=r.low, high=r.high, bootstrap=r.bootstrap,
                 raw_rate=r.raw, sensitivity=r.sensitivity, false_positive=r.false_positive, n_images=r.n_images,
                 weak_detection=r.weak_detection, upper_only=r.upper_only, baseline_rates=self.baseline_rates,
                 heldout_accuracy=self.heldout_accuracy)
        return buffer.getvalue()


@dataclass
class SavedAudit:
    """What :meth:`AuditResult.to_npz` keeps: vendors (V,), rates, confusion (V, K, K), baseline rates (V,)
    and the classifier's held-out accuracy (NaN in an audit saved before it was kept)."""

    vendors: list[str]
    rates: VendorRates
    confusion: np.ndarray
    baseline_rates: np.ndarray
    heldout_accuracy: float = float("nan")


def load_audit(path: Path) -> SavedAudit:
    with np.load(path, allow_pickle=False) as saved:
        rates = VendorRates(saved["rate"], saved["low"], saved["high"], saved["bootstrap"], saved["raw_rate"],
                            saved["sensitivity"], saved["false_positive"], saved["n_images"],
                            saved["weak_detection"], saved["upper_only"] if "upper_only" in saved.files else None)
        accuracy = float(saved["heldout_accuracy"]) if "heldout_accuracy" in saved.files else float("nan")
        return SavedAudit([str(v) for v in saved["vendors"]], rates, saved["confusion"], saved["baseline_rates"],
                          accuracy)


def run_audit(rows: pd.DataFrame, probs: np.ndarray, embeddings: np.ndarray, classes: tuple[str, ...],
              n_boot: int = 200, seed: int = 0, rules: VerdictRules = VerdictRules(),
              trained: np.ndarray | None = None) -> tuple[AuditResult, pd.DataFrame]:
    """Audit curated ``rows`` (columns image_id, vendor, batch, label; optional sha256, annotator) given
    aligned out-of-sample ``probs`` (N, K) and ``embeddings`` (N, D). ``trained`` (N,) bool marks the
    images the classifier was trained on (their probabilities are out-of-fold); the others were
    scored later. Returns the result and the label-issues table."""
    index = {c: i for i, c in enumerate(classes)}
    given = rows["label"].map(index).to_numpy(np.int64)
    vendors = sorted(rows["vendor"].unique())
    vendor = rows["vendor"].map({v: i for i, v in enumerate(vendors)}).to_numpy(np.int64)
    # injected flips keyed by image content: identical images get identical draws wherever they are
    keys = (rows["sha256"] if "sha256" in rows else rows["image_id"]).astype(str).to_numpy()
    model = fit_noise_model(probs, given, vendor, len(vendors), trained=trained)
    verdicts = label_verdicts(model, given, embeddings, rules)
    rates = vendor_error_rates(probs, given, vendor, model, counted_as_error(rules), n_boot=n_boot, seed=seed,
                               vendor_names=vendors, draw_keys=keys, trained=trained)
    baseline_rates, baseline_flags = cleanlab_baseline(probs, given, vendor)
    accuracy = heldout_accuracy(probs, given, trained)
    annotators = annotator_rates(rows, probs, given, verdicts["verdict"], rules, n_boot, seed, keys, trained, accuracy)
    deliveries = subgroup_rates(rows, rows["batch"], probs, given, rules, n_boot, seed, keys, trained)
    names = np.array(classes)
    issues = pd.DataFrame({
        "image_id": rows["image_id"].to_numpy(),
        "vendor": rows["vendor"].to_numpy(),
        "batch": rows["batch"].to_numpy(),
        "given_label": rows["label"].to_numpy(),
        "suggested_label": names[verdicts["suggested"]],
        "p_error": verdicts["p_error"].round(4),
        "verdict": verdicts["verdict"],
        "cleanlab_flag": baseline_flags,
    }, columns=ISSUE_COLUMNS + ["cleanlab_flag"])
    return AuditResult(vendors, model, verdicts, rates, baseline_rates, annotators, accuracy, deliveries), issues


@dataclass
class GroupRates:
    """Rates of groups nested in the vendors (deliveries, annotators): ``names`` (G,) ``vendor/part``,
    ``group`` (N,) each image's index into ``names``, ``rates`` per group."""

    names: list[str]
    group: np.ndarray
    rates: VendorRates


def subgroup_rates(rows: pd.DataFrame, part: pd.Series, probs: np.ndarray, given: np.ndarray, rules: VerdictRules,
                   n_boot: int, seed: int, keys: np.ndarray, trained: np.ndarray | None) -> GroupRates:
    """The vendor estimator with ``vendor/part`` groups as the annotating groups (one confusion matrix
    each): ``part`` (N,) names each image's group within its vendor (a batch, an annotator)."""
    group_name = (rows["vendor"].astype(str) + ANNOTATOR_SEPARATOR + part.astype(str)).to_numpy()
    names = sorted(set(group_name))
    group = pd.Series(group_name).map({g: i for i, g in enumerate(names)}).to_numpy(np.int64)
    rates = vendor_error_rates(probs, given, group, counted_of=counted_as_error(rules), n_boot=n_boot, seed=seed,
                               vendor_names=names, draw_keys=keys, trained=trained)
    return GroupRates(names, group, rates)


def split_group_names(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """``table`` whose ``vendor`` column holds ``vendor/part`` names, with the part moved to ``column``
    (inserted after ``vendor``)."""
    vendor_and_part = table["vendor"].str.split(ANNOTATOR_SEPARATOR, n=1, expand=True)
    table = table.assign(vendor=vendor_and_part[0])
    table.insert(1, column, vendor_and_part[1])
    return table


def annotator_rates(rows: pd.DataFrame, probs: np.ndarray, given: np.ndarray, verdict: np.ndarray,
                    rules: VerdictRules, n_boot: int, seed: int, keys: np.ndarray,
                    trained: np.ndarray | None, accuracy: float = float("nan")) -> pd.DataFrame | None:
    """Each annotator's error rate within its vendor, by the same estimator with annotators as the
    annotating groups (one confusion matrix per vendor/annotator pair); rows without a name form the
    group ``(unnamed)``. None unless some vendor's rows name more than one annotator: with one group
    per vendor the table would repeat the scorecard. ``accuracy``: the classifier's held-out accuracy,
    for the reliability of each annotator's rate."""
    if "annotator" not in rows:
        return None
    annotator = rows["annotator"].astype(str).str.strip().replace("", "(unnamed)")
    if not (annotator.groupby(rows["vendor"]).nunique() > 1).any():
        return None
    groups = subgroup_rates(rows, annotator, probs, given, rules, n_boot, seed, keys, trained)
    table = rate_table(groups.names, groups.group, verdict, groups.rates,
                       reliability=assess_reliability(groups.rates, accuracy, probs.shape[1]))
    table = split_group_names(table, "annotator")
    return table.sort_values(["vendor", "error_rate", "annotator"]).reset_index(drop=True)
