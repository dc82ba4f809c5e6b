"""Verdicts against the buyer's contract: per vendor, pay, warn or drop.

A contract sets the highest error rate paid for: ``contract_max_error_rate`` for every vendor, or a
vendor's own in ``contract_overrides``. A rated vendor whose 95% interval lies wholly below its limit
L is ``within`` (pay), wholly above it ``breach`` (drop), and around it ``undecided`` (warn): the data
cannot tell yet, and the planned hand checks most likely to decide it are counted. A vendor within its
limit whose newest delivery got worse (its ``worsening`` column, :func:`ml.deliveries.with_worsening`)
stays ``within`` but its action is warn: it is paid for what it delivered, and watched. A vendor without
a limit gets no verdict. A vendor with too few images to rate, or whose rate rests on a classifier too
weak to measure it (its ``note`` starts with :data:`ml.reliability.UNRELIABLE`), is ``undecided``: a
verdict on such a figure would pay or drop a vendor on the model's mistakes.

The verdicts are columns of the scorecard (:data:`CONTRACT_COLUMNS`); everything said about them (the
report's first lines, the run's summary, the Dagster asset check, the exit status) is read back from
those columns, so it always agrees with ``scorecard.csv``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from ml.check_plan import Plan, checks_to_exclude, on_the_point
from ml.check_sampling import MIN_CHECKS_FOR_NORMAL
from ml.estimate import MIN_IMAGES_TO_RATE
from ml.reliability import UNRELIABLE
from ml.scorecard import MODEL_ONLY, RATED, rate_basis
from ml.wording import count, percent_interval

CONTRACT_COLUMNS = ["contract_limit", "contract_verdict", "contract_action", "checks_to_decide"]
WITHIN, UNDECIDED, BREACH = "within", "undecided", "breach"
ACTIONS = {WITHIN: "pay", UNDECIDED: "warn", BREACH: "drop"}
MODEL_ONLY_CAVEAT = ("Model-only figures count the errors the classifier can see; errors it cannot see (for example "
                     "labels copied from a similar model, or errors on genuinely hard images) are not ruled out until "
                     "hand checks are combined.")


def vendor_limits(vendors: Iterable[str], max_error_rate: float | None,
                  overrides: Mapping[str, float]) -> dict[str, float | None]:
    """Each vendor's contract limit: its override, else ``max_error_rate`` (None: no contract)."""
    return {vendor: overrides.get(vendor, max_error_rate) for vendor in vendors}


def unknown_override_vendors(vendors: Iterable[str], overrides: Mapping[str, float]) -> list[str]:
    """The vendors ``overrides`` names that delivered nothing (a typo would leave the real vendor on the
    default limit)."""
    known = set(vendors)
    return sorted(vendor for vendor in overrides if vendor not in known)


def got_worse(scorecard: pd.DataFrame) -> pd.Series:
    """Per row, how the vendor got worse (its ``worsening`` text), "" where it did not or is not tested."""
    if "worsening" not in scorecard:
        return pd.Series("", index=scorecard.index)
    return scorecard["worsening"].fillna("").astype(str)


def _unreliable(scorecard: pd.DataFrame) -> pd.Series:
    notes = scorecard["note"].fillna("").astype(str) if "note" in scorecard else pd.Series("", index=scorecard.index)
    return notes.str.contains(UNRELIABLE, regex=False)


def contract_verdicts(scorecard: pd.DataFrame, limits: Mapping[str, float | None], issues: pd.DataFrame,
                      plans: list[Plan]) -> pd.DataFrame:
    """The contract's columns (:data:`CONTRACT_COLUMNS`) for each row of ``scorecard``, on its index.

    Parameters
    ----------
    scorecard : one row per vendor: vendor, error_rate, error_rate_low, error_rate_high, status, note
        [, worsening].
    limits : vendor -> its limit, a fraction (:func:`vendor_limits`); None or absent: no contract.
    issues : label_issues rows (image_id, vendor, p_error, verdict [, model_verdict, check_source]), for
        the planner.
    plans : the recorded check plans (:func:`ml.check_plan.read_plans`).

    Returns
    -------
    ``contract_limit`` (float, NaN without a limit), ``contract_verdict`` (within, undecided, breach, or
    "" without a limit), ``contract_action`` (pay, warn, drop, or ""; warn for a vendor within its limit
    that got worse), ``checks_to_decide`` (Int64: for
    an undecided rated vendor, the further checks of one more plan expected to take the limit out of
    its interval, :func:`ml.check_plan.checks_to_exclude`; missing otherwise, and where the rate sits on
    the limit: no number of checks would decide it).
    """
    limit = scorecard["vendor"].map(lambda v: limits.get(v)).astype(float).to_numpy()
    rate, low, high = (pd.to_numeric(scorecard[c]).to_numpy(float)
                       for c in ("error_rate", "error_rate_low", "error_rate_high"))
    has_limit = np.isfinite(limit)
    rated = (scorecard["status"] == RATED).to_numpy() & ~_unreliable(scorecard).to_numpy()
    verdict = np.where(~has_limit, "", np.where(rated & (high < limit), WITHIN,
                                                np.where(rated & (low > limit), BREACH, UNDECIDED)))
    to_decide = np.full(len(scorecard), np.nan)
    # unrated vendors get no count: hand checks do not make a vendor with too few images rated
    asks = (verdict == UNDECIDED) & (scorecard["status"] == RATED).to_numpy()
    if asks.any():
        vendors = scorecard["vendor"].astype(str).tolist()
        to_decide = checks_to_exclude(issues, plans, vendors, rate, low, high, np.where(asks, limit, np.nan))
    action = np.array([ACTIONS.get(v, "") for v in verdict], dtype=object)
    action[(verdict == WITHIN) & (got_worse(scorecard) != "").to_numpy()] = ACTIONS[UNDECIDED]
    return pd.DataFrame({
        "contract_limit": limit,
        "contract_verdict": verdict,
        "contract_action": action,
        "checks_to_decide": pd.array(to_decide, dtype="Float64").astype("Int64"),  # whole numbers, NaN: none
    }, index=scorecard.index, columns=CONTRACT_COLUMNS)


def with_contract(scorecard: pd.DataFrame, limits: Mapping[str, float | None], issues: pd.DataFrame,
                  plans: list[Plan]) -> pd.DataFrame:
    """``scorecard`` with :data:`CONTRACT_COLUMNS` appended after its own (:func:`contract_verdicts`)."""
    return pd.concat([scorecard.drop(columns=[c for c in CONTRACT_COLUMNS if c in scorecard]),
                      contract_verdicts(scorecard, limits, issues, plans)], axis=1)


def limits_changed(scorecard: pd.DataFrame, limits: Mapping[str, float | None]) -> bool:
    """Whether ``limits`` (:func:`vendor_limits`) differ from those the scorecard's verdicts were drawn
    against (none where it has no contract columns): the contract was edited since."""
    written = pd.to_numeric(scorecard["contract_limit"], errors="coerce") if "contract_limit" in scorecard \
        else pd.Series(np.nan, index=scorecard.index)
    wanted = scorecard["vendor"].astype(str).map(lambda v: limits.get(v)).astype(float)
    return not np.array_equal(written.to_numpy(float), wanted.to_numpy(float), equal_nan=True)


def vendors_by_verdict(scorecard: pd.DataFrame) -> dict[str, list[str]]:
    """Verdict (within, undecided, breach) -> the vendors that have it, in scorecard order; all empty
    when the scorecard has no contract columns (written before they existed) or no vendor a limit."""
    verdicts = scorecard["contract_verdict"].fillna("").astype(str) if "contract_verdict" in scorecard \
        else pd.Series("", index=scorecard.index)
    return {v: scorecard.loc[verdicts == v, "vendor"].astype(str).tolist() for v in (WITHIN, UNDECIDED, BREACH)}


def limit_text(limit: float) -> str:
    """A limit as a percentage, with the decimals it was written with (5.0%, 2.5%, 1.25%)."""
    text = f"{100 * limit:.2f}"
    return (text[:-1] if text.endswith("0") else text) + "%"


def verdict_lines(scorecard: pd.DataFrame) -> list[tuple[str, str]]:
    """Per vendor with a limit, in scorecard order: ``(head, text)``, the head ``"c: drop"`` (vendor and
    action), the text the verdict and why, with what the rate rests on (:func:`rate_basis`), e.g.
    ``"breach: 17.9% (15.1-20.8%) is above the contract's 10.0% (model only)"``; for an undecided
    vendor, the planned checks most likely to decide it. None when no vendor has a limit."""
    if "contract_verdict" not in scorecard:
        return []
    basis = rate_basis(scorecard)
    unreliable = _unreliable(scorecard)
    worse = got_worse(scorecard)
    lines = []
    for i, row in scorecard.iterrows():
        verdict = str(row["contract_verdict"]) if pd.notna(row["contract_verdict"]) else ""
        if not verdict:
            continue
        limit = float(row["contract_limit"])
        rate = float(row["error_rate"])
        interval = percent_interval(rate, row["error_rate_low"], row["error_rate_high"])
        based = percent_interval(rate, row["error_rate_low"], row["error_rate_high"], basis[i])
        if verdict == WITHIN:
            text = f"within: {interval} is below the contract's {limit_text(limit)} ({basis[i]})"
            if worse[i]:
                text += f", but it {worse[i]}"
        elif verdict == BREACH:
            text = f"breach: {interval} is above the contract's {limit_text(limit)} ({basis[i]})"
        elif row["status"] != RATED:
            text = (f"undecided: too few images to rate ({count(int(row['n_images']), 'image')}, under "
                    f"{MIN_IMAGES_TO_RATE}): no verdict against the contract's {limit_text(limit)} until the vendor "
                    "has delivered more")
        else:
            if unreliable[i]:
                text = (f"undecided: {interval} rests on a classifier too weak to measure it (see the vendor's note): "
                        f"no verdict against the contract's {limit_text(limit)} from the model alone")
            elif on_the_point(rate, limit):
                text = f"undecided: {based} sits on the contract's {limit_text(limit)}"
            else:
                text = f"undecided: the limit {limit_text(limit)} is inside {based}"
            checks = row["checks_to_decide"]
            text += ("; checks would not decide it" if pd.isna(checks) else
                     f"; about {int(checks):,} planned checks would most likely decide it: {plan_command(int(checks))}")
        lines.append((f"{row['vendor']}: {row['contract_action']}", text))
    return lines


def plan_command(checks: int) -> str:
    """The command that draws ``checks`` expected checks per vendor."""
    return f"vendor-audit plan --budget {checks}"


def checks_for_basis(scorecard: pd.DataFrame) -> pd.Series:
    """Per scorecard row, the planned checks that would make its verdict rest on hand checks.

    A vendor's rate combines its checks once it has answers from a plan that covers all its images
    (:func:`ml.check_plan.vendor_checks`); the number suggested is the contract's ``checks_to_decide``
    where it gives one, else ``MIN_CHECKS_FOR_NORMAL`` (the plan size from which the interval no longer
    rests on the checks-only bound), at most the vendor's images.

    Parameters
    ----------
    scorecard : rows with vendor, n_images, status (and checks_error_rate, checks_to_decide when there).

    Returns
    -------
    Int64 per row: the number for a rated vendor whose rate is the model's alone (:func:`rate_basis`);
    missing for one whose rate combines hand checks and for one with too few images to rate.
    """
    to_decide = pd.to_numeric(scorecard["checks_to_decide"], errors="coerce") if "checks_to_decide" in scorecard \
        else pd.Series(np.nan, index=scorecard.index)
    fallback = np.minimum(MIN_CHECKS_FOR_NORMAL, pd.to_numeric(scorecard["n_images"]))
    asks = (rate_basis(scorecard) == MODEL_ONLY) & (scorecard["status"] == RATED)
    return to_decide.astype(float).fillna(fallback).where(asks).astype("Int64")


def basis_lines(scorecard: pd.DataFrame) -> list[str]:
    """Per rated vendor whose rate is the model's alone, in scorecard order, the planned checks that would
    make its verdict check-based (:func:`checks_for_basis`), as the command that draws them, e.g.
    ``"b: about 100 planned checks, once answered, would make its verdict check-based: vendor-audit plan
    --budget 100"``; none when every rated vendor's rate combines hand checks."""
    checks = checks_for_basis(scorecard)
    return [f"{vendor}: about {n:,} planned checks, once answered, would make its verdict check-based: "
            f"{plan_command(n)}" for vendor, n in zip(scorecard["vendor"].astype(str), checks) if pd.notna(n)]
