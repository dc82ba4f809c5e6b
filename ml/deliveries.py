"""Each delivery's own error rate: the vendor estimator with deliveries (``vendor/batch``) as the
annotating groups, so that a worse batch is not hidden in its vendor's pooled rate."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from ml.audit import GroupRates, split_group_names
from ml.reliability import assess_reliability
from ml.scorecard import rate_table

# reports/deliveries.csv: the contract's columns first
DELIVERY_COLUMNS = ["vendor", "delivery", "delivered_at", "n_images", "error_rate", "error_rate_low",
                    "error_rate_high", "basis", "status"]
MODEL_ONLY = "model only"


def delivery_table(deliveries: GroupRates, verdict: np.ndarray, vendor_upper_only: dict[str, bool],
                   heldout_accuracy: float, n_classes: int, delivered_at: dict[str, str] | None = None,
                   checks: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per delivery: DELIVERY_COLUMNS, then ``note``, ``rank`` and the hand-check columns.

    Parameters
    ----------
    deliveries : the rates of the ``vendor/batch`` groups (:func:`ml.audit.subgroup_rates`).
    verdict : (N,) each image's verdict, aligned with ``deliveries.group``.
    vendor_upper_only : per vendor, whether its own rate is bounded from above only (the classifier
        learned from that vendor alone): its deliveries' rates are too, whatever their number.
    heldout_accuracy, n_classes : the classifier's, for the reliability note (:mod:`ml.reliability`).
    delivered_at : per ``vendor/batch``, when it was ingested (ISO time; empty when unknown).
    checks : per ``vendor/batch`` (:func:`ml.check_plan.vendor_checks` with those groups): where a
        delivery's images are all in some check plan and some are checked, its rate combines them
        (``basis`` "checked (n checks)"); otherwise the model's (``basis`` "model only").

    Small deliveries follow the vendors' rule: under MIN_IMAGES_TO_RATE images, shown but not rated.
    """
    rates = deliveries.rates
    vendor_of = np.array([name.split("/", 1)[0] for name in deliveries.names])
    upper = rates.upper_only | np.array([vendor_upper_only.get(v, False) for v in vendor_of])
    rates = replace(rates, low=np.where(upper, 0.0, rates.low), upper_only=upper)
    combined = checks["combined"].to_numpy(bool) if checks is not None else np.zeros(len(deliveries.names), bool)
    reliability = assess_reliability(rates, heldout_accuracy, n_classes, combined=combined)
    table = rate_table(deliveries.names, deliveries.group, verdict, rates, checks=checks, reliability=reliability)
    n_checked = checks["n_checked"].to_numpy(int) if checks is not None else np.zeros(len(table), int)
    basis = [f"checked ({n} checks)" if c else MODEL_ONLY for c, n in zip(combined, n_checked)]
    table = table.assign(basis=basis,
                         delivered_at=[(delivered_at or {}).get(name, "") for name in deliveries.names])
    table = split_group_names(table, "delivery")
    # ranks compare vendors (the scorecard); deliveries of different vendors are not ranked against each other
    rest = [c for c in table.columns if c not in DELIVERY_COLUMNS and c != "rank"]
    return table[DELIVERY_COLUMNS + rest].sort_values(["vendor", "delivered_at", "delivery"]).reset_index(drop=True)
