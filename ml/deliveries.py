"""Each delivery's own error rate: the vendor estimator with deliveries (``vendor/batch``) as the
annotating groups, so that a worse batch is not hidden in its vendor's pooled rate."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd

from ml.audit import GroupRates, split_group_names
from ml.check_plan import Plan
from ml.contract import BREACH, CONTRACT_COLUMNS, UNDECIDED, WITHIN, contract_verdicts, limit_text
from ml.wording import percent_interval
from ml.reliability import assess_reliability
from ml.estimate import MIN_IMAGES_TO_RATE
from ml.scorecard import RATED, add_notes, holm, rate_table

# reports/deliveries.csv: the contract's columns first
DELIVERY_COLUMNS = ["vendor", "delivery", "delivered_at", "n_images", "error_rate", "error_rate_low",
                    "error_rate_high", "basis", "status"]


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
        (``basis`` "checked (n checks)", :func:`ml.scorecard.basis_text`); otherwise the model's (``basis``
        "model only").

    Small deliveries follow the vendors' rule: under MIN_IMAGES_TO_RATE images, shown but not rated.
    """
    rates = deliveries.rates
    vendor_of = np.array([name.split("/", 1)[0] for name in deliveries.names])
    upper = rates.upper_only | np.array([vendor_upper_only.get(v, False) for v in vendor_of])
    rates = replace(rates, low=np.where(upper, 0.0, rates.low), upper_only=upper)
    combined = checks["combined"].to_numpy(bool) if checks is not None else np.zeros(len(deliveries.names), bool)
    reliability = assess_reliability(rates, heldout_accuracy, n_classes, combined=combined)
    table = rate_table(deliveries.names, deliveries.group, verdict, rates, checks=checks, reliability=reliability)
    table = table.assign(delivered_at=[(delivered_at or {}).get(name, "") for name in deliveries.names])
    table = split_group_names(table, "delivery")
    # ranks compare vendors (the scorecard); deliveries of different vendors are not ranked against each other
    rest = [c for c in table.columns if c not in DELIVERY_COLUMNS and c != "rank"]
    return table[DELIVERY_COLUMNS + rest].sort_values(["vendor", "delivered_at", "delivery"]).reset_index(drop=True)


def with_delivery_contract(table: pd.DataFrame, limits: dict[str, float | None], issues: pd.DataFrame,
                           plans: list[Plan]) -> pd.DataFrame:
    """``table`` (:func:`delivery_table`) with :data:`ml.contract.CONTRACT_COLUMNS` per delivery, judged as
    a vendor is (:func:`ml.contract.contract_verdicts`) against its vendor's limit (``limits``, vendor ->
    limit); ``checks_to_decide`` counts checks among the delivery's own images. ``issues``: label_issues
    rows with ``vendor`` as ``vendor/batch``."""
    groups = table.assign(vendor=table["vendor"].astype(str) + "/" + table["delivery"].astype(str))
    group_limits = {group: limits.get(vendor) for group, vendor in zip(groups["vendor"], table["vendor"])}
    verdicts = contract_verdicts(groups, group_limits, issues, plans)
    return pd.concat([table.drop(columns=[c for c in CONTRACT_COLUMNS if c in table]), verdicts], axis=1)


def delivery_check(row, worse: str = "") -> tuple[bool, str, str]:
    """The verdict on one delivery for its asset check: ``(passed, severity, description)``, severity
    ``"ERROR"`` for a breach of its vendor's contract, ``"WARN"`` for an undecided delivery or, with
    ``worse`` (:func:`worsening_note` where this is the newest delivery of a vendor found worse), one
    that got worse than the vendor's earlier ones.

    ``row``: a row of reports/deliveries.csv (:func:`with_delivery_contract`)."""
    verdict = str(row["contract_verdict"]) if pd.notna(row["contract_verdict"]) else ""
    rate = percent_interval(row["error_rate"], row["error_rate_low"], row["error_rate_high"], str(row["basis"]))
    said = []
    if verdict == BREACH:
        said.append(f"breach: {rate} is above the contract's {limit_text(float(row['contract_limit']))} (drop)")
    elif verdict == UNDECIDED:
        if row["status"] != RATED:
            said.append(f"undecided: too few images to rate ({int(row['n_images'])}) (warn)")
        else:
            said.append(f"undecided: the limit {limit_text(float(row['contract_limit']))} is inside {rate} (warn)")
    if worse:
        said.append(f"{worse} (warn)")
    if said:
        return False, "ERROR" if verdict == BREACH else "WARN", "; ".join(said)
    if verdict == WITHIN:
        return True, "", f"within: {rate} is below the contract's {limit_text(float(row['contract_limit']))} (pay)"
    return True, "", f"{rate}; no contract set" if row["status"] == RATED else "too few images to rate; no contract set"


WORSENING_COLUMNS = ["vendor", "newest", "newest_rate", "earlier_rate", "difference", "difference_low",
                     "difference_high", "p_value", "p_holm", "worse"]
LEVEL = 0.05  # family-wise, across the vendors tested (Holm), as the vendor comparisons are


def _recent(mine: list[int], names: np.ndarray, delivered_at: dict[str, str], window_days: int | None) -> int:
    """How many of ``mine`` (in delivery order) are recent: the newest alone, or with ``window_days`` every
    delivery ingested within that many days before the newest (an unknown time counts as earlier)."""
    if window_days is None:
        return 1
    times = pd.to_datetime([delivered_at.get(names[g], "") or None for g in mine], utc=True, errors="coerce")
    if pd.isna(times[-1]):
        return 1
    return max(1, int((times >= times[-1] - pd.Timedelta(days=window_days)).sum()))


def worsening(deliveries: GroupRates, delivered_at: dict[str, str],
              min_images: int = MIN_IMAGES_TO_RATE, window_days: int | None = None) -> pd.DataFrame:
    """Per vendor: are its newest deliveries worse than its earlier ones together?

    The newest delivery is the last ingested (``delivered_at`` per ``vendor/batch``, then the name); with
    ``window_days``, the recent deliveries are those ingested within that many days before it. The recent
    deliveries' image-weighted rate is compared with the earlier ones' through the estimator's own
    bootstrap (B, G): every replicate refits the whole noise model, so both rates come from the same draw,
    and a bias common to the vendor's deliveries cancels in the difference. The one-sided p-value is the
    share of replicates where the recent rate is not higher, ``(1 + #) / (B + 1)``; ``p_holm`` adjusts it
    across the vendors tested; ``worse`` is ``p_holm < LEVEL``. Vendors are tested only when the recent
    and the earlier deliveries each have ``min_images``: small samples are not judged, as they are not
    rated. Returns WORSENING_COLUMNS, one row per vendor tested; ``newest`` names the recent deliveries
    (``|`` between several).
    """
    rates = deliveries.rates
    names = np.array(deliveries.names)
    vendor_of = np.array([name.split("/", 1)[0] for name in names])

    def weighted(groups: np.ndarray, values: np.ndarray) -> np.ndarray:
        weight = rates.n_images[groups].astype(float)
        return values[..., groups] @ weight / weight.sum()

    rows = []
    for vendor in sorted(set(vendor_of)):
        mine = np.flatnonzero(vendor_of == vendor)
        if len(mine) < 2:
            continue
        mine = sorted(mine, key=lambda g: (delivered_at.get(names[g], ""), names[g]))
        recent_count = _recent(mine, names, delivered_at, window_days)
        recent, earlier = np.array(mine[len(mine) - recent_count:]), np.array(mine[:len(mine) - recent_count])
        if len(earlier) == 0 or rates.n_images[recent].sum() < min_images or rates.n_images[earlier].sum() < min_images:
            continue
        recent_rate, earlier_rate = float(weighted(recent, rates.rate)), float(weighted(earlier, rates.rate))
        replicates = weighted(recent, rates.bootstrap) - weighted(earlier, rates.bootstrap)
        low, high = np.quantile(replicates, [0.025, 0.975])
        rows.append({"vendor": vendor, "newest": "|".join(names[g].split("/", 1)[1] for g in recent),
                     "newest_rate": recent_rate, "earlier_rate": earlier_rate,
                     "difference": recent_rate - earlier_rate, "difference_low": float(low),
                     "difference_high": float(high),
                     "p_value": float((1 + (replicates <= 0).sum()) / (len(replicates) + 1))})
    table = pd.DataFrame(rows, columns=WORSENING_COLUMNS[:-2])
    table["p_holm"] = holm(table["p_value"].to_numpy()) if len(table) else pd.Series(dtype=float)
    table["worse"] = table["p_holm"] < LEVEL
    return table.round({"newest_rate": 4, "earlier_rate": 4, "difference": 4, "difference_low": 4,
                        "difference_high": 4, "p_value": 4, "p_holm": 4})


def worsening_note(row) -> str:
    """The scorecard note of a vendor whose newest deliveries are worse than its earlier ones."""
    newest = str(row.newest).split("|")
    what = f"its newest delivery {newest[0]} reads" if len(newest) == 1 else \
        f"its newest deliveries {', '.join(newest)} read"
    return (f"got worse: {what} {100 * row.newest_rate:.1f}% against "
            f"{100 * row.earlier_rate:.1f}% for its earlier ones, {100 * row.difference:+.1f} points (95% interval "
            f"{100 * row.difference_low:+.1f} to {100 * row.difference_high:+.1f}; Holm-adjusted p = "
            f"{row.p_holm:.3f} across the vendors tested)")


def with_worsening(scorecard: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """``scorecard`` with a ``worsening`` column (:func:`worsening_note` for each vendor found worse, ""
    for the others), the same text added to those vendors' ``note``; the contract turns a vendor that
    got worse from pay into warn (:func:`ml.contract.contract_verdicts`)."""
    notes = {row.vendor: worsening_note(row) for row in table[table["worse"].astype(bool)].itertuples(index=False)}
    said = scorecard["vendor"].astype(str).map(notes).fillna("")
    return scorecard.assign(note=add_notes(scorecard["note"], said), worsening=said)
