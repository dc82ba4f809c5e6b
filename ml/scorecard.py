"""The vendor scorecard and pairwise vendor comparisons, with the guards that keep claims honest.

A vendor with fewer than ``MIN_IMAGES_TO_RATE`` images is reported as "too few images to rate": its
interval is shown, it gets no rank and takes part in no comparison. Pairwise p-values are Holm-adjusted
across every pair tested, and a vendor is called better only where the adjusted p-value says so.

With hand checks (``checks``: the per-vendor frame of :func:`ml.check_plan.vendor_checks`), a vendor
whose checks are combined with the model gets the combined estimate as its ``error_rate`` and its
interval; the model-only figures stay in ``model_error_rate*``. Every row's ``basis`` says which: ``checked
(N checks)``, valid whatever the model, or ``model only``, valid where the vendor's errors are as
visible to the classifier as modelled; where the two intervals do not overlap, the note says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import norm

from ml.estimate import MIN_IMAGES_TO_RATE, VendorRates, exact_binomial_interval
from ml.reliability import Reliability, assess_reliability, unreliable_note, what_would_help
from ml.wording import count, percent_bracket

SCORECARD_COLUMNS = ["vendor", "n_images", "n_flagged", "n_ambiguous", "error_rate", "error_rate_low",
                     "error_rate_high", "rank"]
COMPARISON_COLUMNS = ["vendor_a", "vendor_b", "difference", "difference_low", "difference_high", "p_value",
                      "p_holm", "p_text", "conclusion"]
# appended to the scorecard when hand checks are folded in (after the columns the asset adds)
SCORECARD_CHECK_COLUMNS = ["n_checked", "checked_errors", "checks_error_rate", "checks_error_rate_low",
                           "checks_error_rate_high", "model_error_rate", "model_error_rate_low",
                           "model_error_rate_high", "gold_images", "gold_accuracy"]
RATED = "rated"
CHECKED, MODEL_ONLY = "checked", "model only"  # what a rate rests on (the ``basis`` column)
DISAGREE = "hand checks disagree with the model-only estimate"
UPPER_ONLY_NOTE = ("the model learned from one vendor only, so its own mistakes cannot be told from that vendor's "
                   "errors: the rate is an upper estimate (the interval starts at 0); hand checks measure it "
                   "(vendor-audit plan)")
TOO_FEW = "too few images to rate"
SMALLEST_P = 0.001  # normal tails are not trusted further out than this with a few hundred replicates


def _checks_by_group(names: list[str], checks: pd.DataFrame) -> pd.DataFrame:
    """The per-vendor checks frame in ``names`` order (a vendor it lacks: no checks)."""
    frame = checks.set_index("vendor").reindex(names)
    frame["combined"] = frame["combined"].fillna(False).astype(bool)
    for column in ("n_checked", "checked_errors", "gold_images", "outside_plans"):
        if column in frame:
            frame[column] = frame[column].fillna(0).astype(int)
    return frame


def combined_rates(names: list[str], rates: VendorRates,
                   checks: pd.DataFrame | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per group (G,): the rate, its 95% interval (low, high) and whether it combines hand checks: the
    combined estimate where ``checks`` says so, the model's elsewhere."""
    if checks is None:
        return rates.rate, rates.low, rates.high, np.zeros(len(names), bool)
    frame = _checks_by_group(names, checks)
    use = frame["combined"].to_numpy(bool)
    return (np.where(use, frame["combined_rate"].to_numpy(float), rates.rate),
            np.where(use, frame["combined_low"].to_numpy(float), rates.low),
            np.where(use, frame["combined_high"].to_numpy(float), rates.high), use)


def basis_text(combined: np.ndarray, n_checked: np.ndarray) -> list[str]:
    """The ``basis`` column.

    Parameters
    ----------
    combined : (G,) bool, whether each group's rate combines hand checks.
    n_checked : (G,) int, the design checks of each group.

    Returns
    -------
    Per group, ``"checked (N checks)"`` where its rate combines hand checks, else ``"model only"``.
    """
    return [f"{CHECKED} ({count(int(n), 'check')})" if c else MODEL_ONLY for c, n in zip(combined, n_checked)]


def rate_basis(scorecard: pd.DataFrame) -> pd.Series:
    """Per scorecard row, what its rate rests on: ``checked`` where it combines hand checks (the
    checks-only columns are filled only then, also in scorecards written before ``basis``), else
    ``model only``."""
    if "checks_error_rate" not in scorecard:
        return pd.Series(MODEL_ONLY, index=scorecard.index)
    combined = pd.to_numeric(scorecard["checks_error_rate"], errors="coerce").notna()
    return pd.Series(np.where(combined, CHECKED, MODEL_ONLY), index=scorecard.index)


def disagreements(card: pd.DataFrame) -> pd.Series:
    """Per row, the warning that the hand checks disagree with the model, "" where they do not.

    Parameters
    ----------
    card : scorecard rows (``error_rate*``, and ``model_error_rate*`` and ``checks_error_rate`` where
        hand checks are folded in).

    Returns
    -------
    str per row of ``card``: where its rate combines hand checks (:func:`rate_basis`) and its interval
    does not overlap the model-only one, both figures and what follows (the model misses some of the
    vendor's errors, or sees some that are not there; the verdict rests on the checks); "" elsewhere.
    """
    warnings = pd.Series("", index=card.index, dtype=object)
    if "model_error_rate_low" not in card:
        return warnings
    model, checked = (card[[f"{prefix}{end}" for end in ("", "_low", "_high")]].apply(pd.to_numeric, errors="coerce")
                      for prefix in ("model_error_rate", "error_rate"))
    apart = (rate_basis(card) == CHECKED) & ((checked["error_rate_high"] < model["model_error_rate_low"])
                                             | (checked["error_rate_low"] > model["model_error_rate_high"]))
    for i in card.index[apart]:
        warnings[i] = (f"{DISAGREE} ({MODEL_ONLY} {percent_bracket(*model.loc[i])}, {CHECKED} "
                       f"{percent_bracket(*checked.loc[i])}): the model misses some of this vendor's errors (or sees "
                       "errors that are not there); the verdict rests on the checks")
    return warnings


def add_notes(notes: pd.Series, added: pd.Series) -> list[str]:
    """Each of ``notes`` with the one of ``added`` beside it (``"; "`` between two non-empty ones)."""
    notes, added = notes.fillna("").astype(str), added.fillna("").astype(str)
    return [f"{n}; {a}" if n and a else n or a for n, a in zip(notes, added)]


def rate_table(names: list[str], group: np.ndarray, verdict: np.ndarray, rates: VendorRates,
               min_images: int = MIN_IMAGES_TO_RATE, checks: pd.DataFrame | None = None,
               reliability: Reliability | None = None, remedies: list[str] | None = None) -> pd.DataFrame:
    """One row per group (vendor, or vendor/annotator) in ``names`` order: SCORECARD_COLUMNS, then
    ``status``, ``note``, ``ambiguous_rate`` and ``basis`` (:func:`basis_text`). ``group`` (N,) indexes
    ``names``; ``verdict`` (N,) str.
    ``rank`` (1 = fewest errors) is given to rated groups only; ``error_rate`` counts clear errors.

    ``reliability`` (default: from the detection slope of ``rates`` alone) and ``remedies``
    (:func:`ml.reliability.what_would_help`) give each group whose model-based rate is unreliable its
    note: that, why, and what would help.

    With ``checks`` (per vendor, :func:`ml.check_plan.vendor_checks`), SCORECARD_CHECK_COLUMNS follow:
    ``error_rate*`` are then the combined estimate where the vendor's checks are combined, the model's
    otherwise (``model_error_rate*`` always); the checks-only columns are empty where not combined, and
    the note of a combined group whose interval does not overlap the model's carries
    :func:`disagreements`."""
    n = len(names)
    n_images = np.bincount(group, minlength=n)
    rated = n_images >= min_images
    rate, low, high, combined = combined_rates(names, rates, checks)
    frame = _checks_by_group(names, checks) if checks is not None else None
    reliability = assess_reliability(rates, float("nan"), 0) if reliability is None else reliability
    remedies = what_would_help("", None) if remedies is None else remedies
    notes = []
    for v in range(n):
        note = []
        if not rated[v]:
            note.append(f"too few images to rate ({n_images[v]} < {min_images}): no rank, no comparison")
        if reliability.unreliable[v] and not combined[v]:  # a rate combined with hand checks holds whatever the model
            note.append(unreliable_note(reliability, v, remedies))
        if rates.upper_only[v] and not combined[v]:
            note.append(UPPER_ONLY_NOTE)
        if frame is not None and frame["n_checked"].iloc[v] and frame["outside_plans"].iloc[v]:
            note.append(f"{frame['outside_plans'].iloc[v]} images are in no check plan (delivered after the last "
                        "one, or none drawn yet): the rate is the model's until a plan covers them (vendor-audit plan)")
        notes.append("; ".join(note))
    table = pd.DataFrame({
        "vendor": names,
        "n_images": n_images,
        "n_flagged": np.bincount(group, weights=verdict == "error", minlength=n).astype(int),
        "n_ambiguous": np.bincount(group, weights=verdict == "ambiguous", minlength=n).astype(int),
        "error_rate": np.round(rate, 4),
        "error_rate_low": np.round(low, 4),
        "error_rate_high": np.round(high, 4),
    })
    table["rank"] = table["error_rate"].where(rated).rank(method="min").astype("Int64")
    table["status"] = np.where(rated, RATED, TOO_FEW)
    table["note"] = notes
    table["ambiguous_rate"] = (table["n_ambiguous"] / table["n_images"].clip(lower=1)).round(4)
    table["basis"] = basis_text(combined, frame["n_checked"].to_numpy() if frame is not None else np.zeros(n, int))
    if frame is not None:
        for column in ("n_checked", "checked_errors"):
            table[column] = frame[column].to_numpy()
        for column in ("checks_error_rate", "checks_error_rate_low", "checks_error_rate_high"):
            table[column] = frame[column].to_numpy(float).round(4)
        table["model_error_rate"] = rates.rate.round(4)
        table["model_error_rate_low"] = rates.low.round(4)
        table["model_error_rate_high"] = rates.high.round(4)
        table["gold_images"] = frame["gold_images"].to_numpy()
        table["gold_accuracy"] = frame["gold_accuracy"].to_numpy(float).round(4)
        table["note"] = add_notes(table["note"], disagreements(table))
    return table


def build_scorecard(vendors: list[str], vendor: np.ndarray, verdict: np.ndarray, rates: VendorRates,
                    min_images: int = MIN_IMAGES_TO_RATE, checks: pd.DataFrame | None = None,
                    reliability: Reliability | None = None, remedies: list[str] | None = None) -> pd.DataFrame:
    """The scorecard: :func:`rate_table` per vendor, rated vendors by rank first, then the others."""
    card = rate_table(vendors, vendor, verdict, rates, min_images, checks, reliability, remedies)
    order = card.assign(_unrated=card["rank"].isna()).sort_values(["_unrated", "rank", "vendor"]).index
    return card.loc[order].reset_index(drop=True)


def read_scorecard(path: Path) -> pd.DataFrame:
    """``reports/scorecard.csv`` as written: vendor names kept as text (a vendor may be named NA or
    null), only empty cells missing."""
    return pd.read_csv(path, dtype={"vendor": str}, keep_default_na=False, na_values=[""])


def checks_last(card: pd.DataFrame) -> pd.DataFrame:
    """``card`` with SCORECARD_CHECK_COLUMNS moved to the end, after columns added to it later: they are
    appended to the scorecard's established columns, whose order is kept."""
    moved = [c for c in SCORECARD_CHECK_COLUMNS if c in card]
    return card[[c for c in card.columns if c not in moved] + moved]


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of (M,) p-values (family-wise error control across all M tests)."""
    p = np.asarray(p_values, float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def format_p_value(p: float) -> str:
    """A p-value at the resolution the method has: ``"< 0.001"`` below it, else two significant digits."""
    if not np.isfinite(p):
        return ""
    if p < SMALLEST_P:
        return f"< {SMALLEST_P:g}"
    return f"{p:.2g}" if p < 0.1 else f"{p:.2f}"


def compare_vendors(vendors: list[str], rates: VendorRates, alpha: float = 0.05,
                    min_images: int = MIN_IMAGES_TO_RATE, checks: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every pair (a, b): ``difference`` = rate(a) - rate(b) with a 95% interval, the two-sided p-value
    and its Holm adjustment across all pairs tested, and a plain-words ``conclusion`` drawn from the
    adjusted p-value.

    The standard error of a difference is the bootstrap's (which keeps the two vendors' covariance),
    never less than the exact binomial intervals of the two vendors allow; the interval and the
    unadjusted p-value come from that one normal approximation, so they agree. Pairs with a vendor under
    ``min_images`` images are listed but not tested.

    A pair where either vendor's rate combines hand checks (``checks``, see :func:`rate_table`) compares
    the rates of the scorecard; its standard error is the root sum of squares of the two vendors' own,
    each read off its 95% interval (``(high - low) / (2 z)``): the checks of two vendors are drawn
    independently.
    """
    exact_low, exact_high = exact_binomial_interval(rates.rate, rates.n_images)
    floor_se = (exact_high - exact_low) / (2 * norm.ppf(0.975))
    rated = rates.n_images >= min_images
    rate, low, high, combined = combined_rates(vendors, rates, checks)
    interval_se = (high - low) / (2 * norm.ppf(0.975))
    rows = []
    for a in range(len(vendors)):
        for b in range(a + 1, len(vendors)):
            if combined[a] or combined[b]:
                point = float(rate[a] - rate[b])
                se = max(float(np.hypot(interval_se[a], interval_se[b])), 1e-9)
            else:
                point = float(rates.rate[a] - rates.rate[b])
                se = max(float(np.std(rates.bootstrap[:, a] - rates.bootstrap[:, b], ddof=1)),
                         float(np.hypot(floor_se[a], floor_se[b])), 1e-9)
            row = {"vendor_a": vendors[a], "vendor_b": vendors[b], "difference": round(point, 4)}
            half = norm.ppf(1 - alpha / 2) * se
            row["difference_low"] = round(max(point - half, -1.0), 4)
            row["difference_high"] = round(min(point + half, 1.0), 4)
            if rated[a] and rated[b]:
                row["p_value"] = float(2 * norm.sf(abs(point) / se))
            else:
                small = [vendors[v] for v in (a, b) if not rated[v]]
                row["p_value"] = np.nan
                row["conclusion"] = f"not compared: too few images to rate {' and '.join(small)}"
            rows.append(row)
    # typed even with no pair (one vendor so far), so the rounding below and the CSV stay numeric
    table = pd.DataFrame(rows, columns=COMPARISON_COLUMNS).astype(
        {"difference": float, "difference_low": float, "difference_high": float, "p_value": float,
         "conclusion": object})
    tested = table["p_value"].notna().to_numpy()
    table["p_holm"] = np.nan
    if tested.any():
        table.loc[tested, "p_holm"] = holm(table.loc[tested, "p_value"].to_numpy())
    for i in np.flatnonzero(tested):
        row = table.iloc[i]
        if row["p_holm"] < alpha:
            a_better = row["difference"] < 0
            better, worse = (row["vendor_a"], row["vendor_b"]) if a_better else (row["vendor_b"], row["vendor_a"])
            table.loc[i, "conclusion"] = f"{better} has fewer errors than {worse}"
        else:
            table.loc[i, "conclusion"] = "not distinguishable with this data"
    table["p_text"] = table["p_holm"].map(format_p_value)
    table["p_value"] = table["p_value"].round(6)
    table["p_holm"] = table["p_holm"].round(6)
    return table[COMPARISON_COLUMNS]
