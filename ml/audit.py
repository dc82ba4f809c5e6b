"""The whole estimate from out-of-fold outputs: noise model, per-image verdicts, per-vendor rates."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ml.estimate import NoiseModel, VendorRates, fit_noise_model, vendor_error_rates
from ml.issues import VerdictRules, cleanlab_baseline, counted_as_error, label_verdicts

ISSUE_COLUMNS = ["image_id", "vendor", "batch", "given_label", "suggested_label", "p_error", "verdict"]


@dataclass
class AuditResult:
    vendors: list[str]
    model: NoiseModel
    verdicts: dict[str, np.ndarray]
    rates: VendorRates
    baseline_rates: np.ndarray  # (V,) cleanlab's num_label_issues share per vendor, on the same probabilities

    def to_npz(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(buffer, vendors=np.array(self.vendors), confusion=self.model.confusion,
                 temperature=self.model.temperature, rate=self.rates.rate, low=self.rates.low,
                 high=self.rates.high, bootstrap=self.rates.bootstrap, raw_rate=self.rates.raw,
                 sensitivity=self.rates.sensitivity, false_positive=self.rates.false_positive,
                 baseline_rates=self.baseline_rates)
        return buffer.getvalue()


def run_audit(rows: pd.DataFrame, probs: np.ndarray, embeddings: np.ndarray, classes: tuple[str, ...],
              n_boot: int = 200, seed: int = 0, rules: VerdictRules = VerdictRules()) -> tuple[AuditResult, pd.DataFrame]:
    """Audit curated ``rows`` (columns image_id, vendor, batch, label) given aligned out-of-fold
    ``probs`` (N, K) and ``embeddings`` (N, D). Returns the result and the label-issues table."""
    index = {c: i for i, c in enumerate(classes)}
    given = rows["label"].map(index).to_numpy(np.int64)
    vendors = sorted(rows["vendor"].unique())
    vendor = rows["vendor"].map({v: i for i, v in enumerate(vendors)}).to_numpy(np.int64)
    model = fit_noise_model(probs, given, vendor, len(vendors))
    verdicts = label_verdicts(model, given, embeddings, rules)
    rates = vendor_error_rates(probs, given, vendor, model, counted_as_error(rules), n_boot=n_boot, seed=seed)
    baseline_rates, baseline_flags = cleanlab_baseline(probs, given, vendor)
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
    return AuditResult(vendors, model, verdicts, rates, baseline_rates), issues
