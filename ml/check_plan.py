"""Hand checks in the audit: which images to check next (plans), and the answers folded into the rates.

A plan is one round of the design of :mod:`ml.check_sampling`: every image of every vendor gets an
inclusion probability from the model's probability that its label is wrong, and is drawn or not by a
draw keyed by its image id and the plan's number. ``DIR/plans/plan-NNN.csv`` keeps the probability of
every image (``image_id, vendor, inclusion_probability, drawn``), so the estimate uses the probability
each checked image really had. Plans are drawn over all images, answered ones included (drawn again,
they cost nothing and are not listed), so rounds are independent.

An answered image is part of the design when some plan drew it (its probability: that of being drawn
by at least one plan, 0 for a plan that did not include it) or when it is a gold image (probability
1). Answers for images that no plan drew are kept for the image's verdict but are left out of the
rate: nobody knows the probability with which they were chosen (a person may have picked them because
they looked wrong), and weighting them as if drawn would bias the rate.

The combined estimate needs every image of the vendor to have a positive probability. Images that
arrived after the last plan have none: until a new plan covers them, the vendor's rate stays the
model's, with a note.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ml.check_sampling import (
    LEVEL, MIN_ERRORS_FOR_NORMAL, checked_error_rates, checks_for_halfwidth, combined_inclusion, draw_plan,
    expected_interval, inclusion_probabilities,
)
from ml.checks import CHECK_SUFFIXES, LABEL_SEPARATOR, answer_files, gold_checks, label_in_set, read_file_rows
from ml.delivery import DeliveryError
from ml.files import atomic_write_bytes, atomic_write_csv, atomic_write_text

PLAN_COLUMNS = ["image_id", "vendor", "inclusion_probability", "drawn"]
PLAN_NAME = re.compile(r"^plan-(\d{3,})\.csv$")
# reports/check_plan.csv: the images drawn by some plan and not answered yet
CHECK_PLAN_COLUMNS = ["image_id", "vendor", "plan", "inclusion_probability", "image_path", "given_label", "p_error"]
# reports/hand_checks.csv: every accepted answer matched to its delivered image (an image checked by
# gold and in checks/ has two rows; gold's answer is the one used)
ANSWER_COLUMNS = ["image_id", "vendor", "given_label", "true_labels", "correct", "kind", "source"]
ANSWER_KINDS = ("gold", "check")  # in order of precedence
# per vendor: the hand checks folded into the rates (ml.scorecard and ml.report read these)
VENDOR_CHECK_COLUMNS = ["vendor", "n_checked", "checked_errors", "checks_error_rate", "checks_error_rate_low",
                        "checks_error_rate_high", "combined", "combined_rate", "combined_low", "combined_high",
                        "gold_images", "gold_accuracy", "unplanned_checks", "awaiting_answers", "outside_plans",
                        "checks_to_halve"]
PLAN_SUMMARY_COLUMNS = ["vendor", "n_images", "expected_checks", "to_check", "from_earlier_plans", "error_rate",
                        "expected_low", "expected_high"]
THUMBS_FOLDER = "check_thumbs"


class CheckPlanError(ValueError):
    """A plan file that is not as ``vendor-audit plan`` wrote it, or a plan that cannot be drawn."""


# ---- the model's side ---------------------------------------------------------------------------------


def model_error(issues: pd.DataFrame) -> np.ndarray:
    """(N,) the model's probability that each image's label is wrong (``f`` of the estimate), 0 where the
    model calls the image ambiguous: ambiguity is not billed.

    Uses ``model_verdict`` (the verdict before any hand check) where label_issues has it, so that an
    answer never changes the model's side of the estimate.
    """
    verdict = issues["model_verdict"] if "model_verdict" in issues else issues["verdict"]
    p_error = np.clip(pd.to_numeric(issues["p_error"]).to_numpy(float), 0.0, 1.0)
    return np.where(verdict.astype(str).to_numpy() == "ambiguous", 0.0, p_error)


# ---- plans --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """One recorded plan: its ``number`` (the round of the keyed draw) and ``table`` (PLAN_COLUMNS)."""

    number: int
    table: pd.DataFrame


def plan_path(folder: Path, number: int) -> Path:
    return folder / f"plan-{number:03d}.csv"


def read_plans(folder: Path) -> list[Plan]:
    """Every ``folder/plan-NNN.csv`` in number order (other files are not plans and are left alone).

    Raises
    ------
    CheckPlanError
        Naming the file (and row) when a plan lacks a column, names an image twice, has a probability
        outside [0, 1], a ``drawn`` other than True/False, or an image drawn with probability 0; or
        when two files carry the same number.
    """
    plans: dict[int, Plan] = {}
    for path in sorted(folder.glob("plan-*.csv")) if folder.is_dir() else []:
        match = PLAN_NAME.match(path.name)
        if not match:
            continue
        number = int(match.group(1))
        if number in plans:
            raise CheckPlanError(f"{path}: plan number {number} is used by another file in {folder}")
        plans[number] = Plan(number, _read_plan(path))
    return [plans[n] for n in sorted(plans)]


def _read_plan(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise CheckPlanError(f"{path}: not a readable plan ({exc})") from exc
    missing = [c for c in PLAN_COLUMNS if c not in table]
    if missing:
        raise CheckPlanError(f"{path}: plan lacks column(s) {', '.join(missing)}")
    repeated = table["image_id"][table["image_id"].duplicated()]
    if len(repeated):
        raise CheckPlanError(f"{path}: row {repeated.index[0] + 1}: image {repeated.iloc[0]!r} is in the plan twice")
    probability = pd.to_numeric(table["inclusion_probability"], errors="coerce")
    bad = probability.isna() | (probability < 0) | (probability > 1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise CheckPlanError(f"{path}: row {row + 1}: inclusion_probability "
                             f"{table['inclusion_probability'].iloc[row]!r} is not a number in [0, 1]")
    drawn = table["drawn"].str.strip().str.lower().map({"true": True, "false": False})
    if drawn.isna().any():
        row = int(np.flatnonzero(drawn.isna())[0])
        raise CheckPlanError(f"{path}: row {row + 1}: drawn {table['drawn'].iloc[row]!r} is not True or False")
    impossible = drawn.to_numpy(bool) & (probability.to_numpy() <= 0)
    if impossible.any():
        row = int(np.flatnonzero(impossible)[0])
        raise CheckPlanError(f"{path}: row {row + 1}: image drawn with inclusion_probability 0")
    return pd.DataFrame({"image_id": table["image_id"], "vendor": table["vendor"],
                         "inclusion_probability": probability.to_numpy(float), "drawn": drawn.to_numpy(bool)},
                        columns=PLAN_COLUMNS)


def plan_design(image_ids: pd.Series | np.ndarray, plans: list[Plan]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where each image (N,) stands in the plans so far.

    Returns
    -------
    inclusion : (N,) float, the probability of being drawn by at least one plan (0 for a plan that
        does not list the image: it arrived later).
    drawn : (N,) bool, whether some plan drew it.
    first_plan : (N,) int, the number of the first plan that drew it, 0 for none.
    """
    ids = pd.Index(np.asarray(image_ids, dtype=object))
    drawn = np.zeros(len(ids), bool)
    first_plan = np.zeros(len(ids), np.int64)
    rounds = []
    for plan in plans:
        table = plan.table.set_index("image_id")
        rounds.append(table["inclusion_probability"].reindex(ids, fill_value=0.0).to_numpy(float))
        this = table["drawn"].reindex(ids, fill_value=False).to_numpy(bool)
        first_plan[this & (first_plan == 0)] = plan.number
        drawn |= this
    inclusion = combined_inclusion(rounds) if rounds else np.zeros(len(ids))
    return inclusion, drawn, first_plan


@dataclass
class CheckPlan:
    """A new plan and what it asks for.

    ``plan`` (PLAN_COLUMNS): every image's probability in this plan and whether it was drawn;
    ``to_check`` (CHECK_PLAN_COLUMNS): images drawn by this or an earlier plan and not answered yet,
    with their probability combined over all plans; ``vendors`` (PLAN_SUMMARY_COLUMNS): per vendor, the
    expected checks of this plan, the images to check (of which from earlier plans), the current rate
    and the 95% interval expected once the listed images are answered.
    """

    number: int
    plan: pd.DataFrame
    to_check: pd.DataFrame
    vendors: pd.DataFrame


def draw_check_plan(issues: pd.DataFrame, answered: set[str], gold: set[str], plans: list[Plan],
                    budget: float | None = None, halfwidth: float | None = None,
                    current_rate: dict[str, float] | None = None) -> CheckPlan:
    """Draw the next plan over every image of ``issues`` (label_issues rows: image_id, vendor, batch,
    given_label, p_error, verdict [, model_verdict]).

    Parameters
    ----------
    answered : image ids with an accepted answer (from checks/ or gold): not listed again.
    gold : image ids whose content is a gold image (checked with certainty, probability 1).
    plans : the plans recorded so far (:func:`read_plans`); the new one is numbered after them.
    budget : expected checks per vendor in this plan; or
    halfwidth : the 95% half-width wanted per vendor: each vendor's budget is the number of checks
        whose expected half-width is ``halfwidth`` (:func:`ml.check_sampling.checks_for_halfwidth`).
    current_rate : vendor -> the current error rate, the centre of the expected interval (default:
        the mean of the model's probabilities of error).
    """
    if (budget is None) == (halfwidth is None):
        raise CheckPlanError("give either a budget (expected checks per vendor) or a half-width, not both")
    if budget is not None and not (math.isfinite(budget) and budget >= 0):
        raise CheckPlanError(f"budget must be a number of checks >= 0 (got {budget})")
    if halfwidth is not None and not (math.isfinite(halfwidth) and 0 < halfwidth < 1):
        raise CheckPlanError(f"half-width must be a fraction between 0 and 1, e.g. 0.02 for 2 points (got {halfwidth})")
    if not len(issues):
        raise CheckPlanError("no image to plan: label_issues.csv is empty")
    ids = issues["image_id"].astype(str).to_numpy()
    vendors = sorted(issues["vendor"].astype(str).unique())
    group = issues["vendor"].astype(str).map({v: g for g, v in enumerate(vendors)}).to_numpy(np.int64)
    f = model_error(issues)
    earlier, drawn_before, first_plan = plan_design(ids, plans)
    is_gold = np.isin(ids, list(gold))
    known = np.where(is_gold, 1.0, earlier)  # what is known to be checked so far, gold with certainty
    def rate_of(g: int) -> float:
        return float((current_rate or {}).get(vendors[g], f[group == g].mean()))

    if budget is not None:
        budgets = np.full(len(vendors), float(budget))
    else:
        budgets = np.array([checks_for_halfwidth(f[group == g], known[group == g], halfwidth, rate_of(g))
                            for g in range(len(vendors))], float)
    number = plans[-1].number + 1 if plans else 1
    pi = inclusion_probabilities(f, group, budgets)
    drawn = draw_plan(pi, ids, number)
    plan = pd.DataFrame({"image_id": ids, "vendor": issues["vendor"].astype(str).to_numpy(),
                         "inclusion_probability": pi, "drawn": drawn}, columns=PLAN_COLUMNS)
    inclusion = combined_inclusion([earlier, pi])
    is_answered = np.isin(ids, list(answered))
    listed = (drawn_before | drawn) & ~is_answered
    to_check = pd.DataFrame({
        "image_id": ids, "vendor": plan["vendor"].to_numpy(), "plan": np.where(first_plan > 0, first_plan, number),
        "inclusion_probability": inclusion.round(6), "image_path": ["landing/" + i for i in ids],
        "given_label": issues["given_label"].astype(str).to_numpy(), "p_error": f.round(4),
    }, columns=CHECK_PLAN_COLUMNS)[listed].sort_values(["vendor", "image_id"]).reset_index(drop=True)
    rows = []
    known_after = np.where(is_gold, 1.0, inclusion)
    for g, vendor in enumerate(vendors):
        members = group == g
        rate = rate_of(g)
        low, high = expected_interval(f[members], known_after[members], rate)
        rows.append({"vendor": vendor, "n_images": int(members.sum()), "expected_checks": round(float(budgets[g]), 1),
                     "to_check": int((listed & members).sum()),
                     "from_earlier_plans": int((listed & members & drawn_before).sum()),
                     "error_rate": round(float(rate), 4), "expected_low": round(low, 4), "expected_high": round(high, 4)})
    return CheckPlan(number, plan, to_check, pd.DataFrame(rows, columns=PLAN_SUMMARY_COLUMNS))


def check_plan_markdown(check_plan: CheckPlan, images: dict[str, np.ndarray]) -> tuple[str, dict[str, bytes]]:
    """reports/check_plan.md for the person who checks, and its thumbnails (path relative to reports/ ->
    PNG bytes). ``images``: image_id -> uint8 image (S, S, C) for every listed image.

    The vendor's label is not shown beside the picture, so that it does not sway the answer; it is in
    check_plan.csv."""
    from ml.report import Gallery, Heading, Paragraph, Picture, Table, to_markdown
    from ml.thumbnails import thumbnail_png

    def percent(value: float) -> str:
        return f"{100 * value:.1f}%" if np.isfinite(value) else "n/a"

    files: dict[str, bytes] = {}
    summary = check_plan.vendors
    blocks = [
        Heading(1, f"Hand-check plan {check_plan.number:03d}"),
        Paragraph((f"{len(check_plan.to_check):,} images to check. For each, write the class or classes the image "
                   f"truly shows into a CSV file under checks/ (any name ending in .csv) with the columns image_id "
                   f"and true_labels, optionally checker and checked_at; several classes are separated by "
                   f"'{LABEL_SEPARATOR}'. Then run vendor-audit run. The vendor's label is not shown here, so that "
                   f"it does not sway the answer (it is in check_plan.csv, with each image's file under landing/).",)),
        Table(("Vendor", "Images", "To check", "From earlier plans", "Error rate now",
               "Expected 95% interval after the checks"),
              tuple((r.vendor, f"{r.n_images:,}", f"{r.to_check:,}", f"{r.from_earlier_plans:,}",
                     percent(r.error_rate),
                     f"{percent(r.expected_low)}-{percent(r.expected_high)}" if np.isfinite(r.expected_low) else "n/a")
                    for r in summary.itertuples(index=False))),
    ]
    for vendor, mine in check_plan.to_check.groupby("vendor", sort=True):
        blocks.append(Heading(2, f"{vendor}: {len(mine):,} images"))
        pictures = []
        for r in mine.itertuples(index=False):
            if r.image_id not in images:
                raise CheckPlanError(f"check plan: no image given for {r.image_id}")
            path = f"{THUMBS_FOLDER}/{_thumb_name(r.image_id)}"
            files[path] = thumbnail_png(images[r.image_id])
            pictures.append(Picture(path, files[path], r.image_id, (r.image_id, r.image_path)))
        blocks.append(Gallery(tuple(pictures)))
    return to_markdown(blocks), files


def _thumb_name(image_id: str) -> str:
    """A file name per image id: readable, and unique through a short digest (ids may contain '/')."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "-", image_id).strip("-")[-60:]
    return f"{readable}-{hashlib.sha256(image_id.encode()).hexdigest()[:8]}.png"


def write_check_plan(plans_dir: Path, reports: Path, check_plan: CheckPlan, markdown: str,
                     files: dict[str, bytes]) -> Path:
    """Write the plan (``plans_dir/plan-NNN.csv``, refused if that number exists), then
    ``reports/check_plan.csv``, the thumbnails and ``reports/check_plan.md``, each atomically; thumbnails
    of an earlier plan that this one does not list are removed. Returns the plan's path."""
    path = plan_path(plans_dir, check_plan.number)
    if path.exists():
        raise CheckPlanError(f"{path} exists already: plans are never overwritten")
    atomic_write_csv(path, check_plan.plan)
    atomic_write_csv(reports / "check_plan.csv", check_plan.to_check)
    for relative, data in files.items():
        atomic_write_bytes(reports / relative, data)
    for stale in (reports / THUMBS_FOLDER).glob("*.png"):
        if f"{THUMBS_FOLDER}/{stale.name}" not in files:
            stale.unlink()
    atomic_write_text(reports / "check_plan.md", markdown)
    return path


# ---- answers --------------------------------------------------------------------------------------------


def collect_answers(rows: pd.DataFrame, checks: pd.DataFrame, gold: pd.DataFrame) -> pd.DataFrame:
    """Every accepted answer matched to its delivered image (ANSWER_COLUMNS), gold first.

    Parameters
    ----------
    rows : curated rows (image_id, vendor, label, sha256).
    checks : accepted answers of :func:`ml.checks.read_checks` (image_id, true_labels, file, row).
    gold : accepted gold of :func:`ml.checks.read_gold` (sha256, true_labels, file, row).

    ``correct`` says whether the given label is in the answer's set; ``source`` names the file and row
    (``checks/round1.csv row 3``, ``gold/honeypots.csv row 2``). An image whose content is gold and
    that was also answered in checks/ has both rows.
    """
    by_id = rows.set_index("image_id")
    matched = gold_checks(rows, gold)
    first_gold = gold.assign(sha256=gold["sha256"].str.lower()).drop_duplicates("sha256").set_index("sha256")
    digests = by_id.loc[matched["image_id"], "sha256"].str.lower().to_numpy()
    gold_source = [f"gold/{first_gold.at[d, 'file']} row {first_gold.at[d, 'row']}" for d in digests]
    frames = [
        pd.DataFrame({"image_id": matched["image_id"].to_numpy(), "true_labels": matched["true_labels"].to_numpy(),
                      "kind": "gold", "source": gold_source}),
        pd.DataFrame({"image_id": checks["image_id"].to_numpy(), "true_labels": checks["true_labels"].to_numpy(),
                      "kind": "check",
                      "source": [f"checks/{f} row {r}" for f, r in zip(checks["file"], checks["row"])]}),
    ]
    answers = pd.concat(frames, ignore_index=True)
    answers["vendor"] = by_id.loc[answers["image_id"], "vendor"].to_numpy() if len(answers) else []
    answers["given_label"] = by_id.loc[answers["image_id"], "label"].to_numpy() if len(answers) else []
    answers["correct"] = label_in_set(answers["given_label"], answers["true_labels"])
    return answers[ANSWER_COLUMNS].reset_index(drop=True)


def read_answers(path: Path) -> pd.DataFrame:
    """reports/hand_checks.csv as :func:`collect_answers` wrote it (ANSWER_COLUMNS); empty when there is
    no such file (no audit has read answers yet)."""
    if not path.is_file():
        return pd.DataFrame({column: pd.Series(dtype=object) for column in ANSWER_COLUMNS})
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in ANSWER_COLUMNS if c not in table]
    if missing:
        raise CheckPlanError(f"{path}: lacks column(s) {', '.join(missing)}: re-run the audit")
    return table.assign(correct=table["correct"] == "True")[ANSWER_COLUMNS]


def chosen_answers(answers: pd.DataFrame) -> pd.DataFrame:
    """One answer per image: gold's where there is one, else the answer from checks/."""
    precedence = answers["kind"].map({kind: i for i, kind in enumerate(ANSWER_KINDS)})
    return answers.assign(_order=precedence).sort_values("_order", kind="stable").drop_duplicates("image_id") \
        .drop(columns="_order")


def apply_checks(issues: pd.DataFrame, answers: pd.DataFrame) -> pd.DataFrame:
    """label_issues with the verdicts that follow the hand checks.

    Adds ``model_verdict`` (the model's verdict, kept), ``checked_labels`` (the answer's set, "" where
    unchecked) and ``check_source``. A checked image's ``verdict`` follows the answer: ``error`` when the
    given label is outside the set, ``ambiguous`` when it is inside a set of several classes (not
    billed), ``ok`` otherwise; its ``suggested_label`` is the given label when correct, else the model's
    suggestion when it is in the set, else the set's first class. ``p_error`` stays the model's.
    """
    chosen = chosen_answers(answers).set_index("image_id")
    labels = issues["image_id"].map(chosen["true_labels"]).fillna("").astype(str)
    out = issues.copy()
    out["model_verdict"] = issues["verdict"]
    out["checked_labels"] = labels.to_numpy()
    out["check_source"] = issues["image_id"].map(chosen["source"]).fillna("").astype(str).to_numpy()
    checked = (labels != "").to_numpy()
    if not checked.any():
        return out
    given = issues["given_label"].astype(str).to_numpy()
    correct = label_in_set(given, labels.to_numpy())
    several = labels.str.contains(re.escape(LABEL_SEPARATOR), regex=True).to_numpy()
    verdict = np.where(~correct, "error", np.where(several, "ambiguous", "ok"))
    out.loc[checked, "verdict"] = verdict[checked]
    suggested = issues["suggested_label"].astype(str).to_numpy()
    model_in_set = label_in_set(suggested, labels.to_numpy())
    first = labels.str.split(LABEL_SEPARATOR, regex=False).str[0].to_numpy()
    out.loc[checked, "suggested_label"] = np.where(correct, given, np.where(model_in_set, suggested, first))[checked]
    return out


def vendor_checks(issues: pd.DataFrame, plans: list[Plan], vendors: list[str], model_low: np.ndarray,
                  model_high: np.ndarray) -> pd.DataFrame:
    """Per vendor (in ``vendors`` order): the hand checks folded into the rate (VENDOR_CHECK_COLUMNS).

    Parameters
    ----------
    issues : label_issues after :func:`apply_checks` (image_id, vendor, given_label, p_error, verdict,
        model_verdict, checked_labels, check_source).
    plans : the recorded plans.
    model_low, model_high : (V,) the model-only 95% interval per vendor, for ``checks_to_halve`` where
        the rate is the model's.

    ``n_checked`` / ``checked_errors``: checks that are part of the design (drawn by a plan, or gold)
    and the errors among them. ``combined`` is True when the vendor has such checks and every one of its
    images is in some plan (or gold); then ``combined_*`` is the estimate of
    :func:`ml.check_sampling.checked_error_rates` and ``checks_error_rate*`` the checks alone (Wilson
    interval); otherwise those are NaN. ``unplanned_checks``: answers for images no plan drew (verdict
    only, not in the rate); ``awaiting_answers``: drawn, not answered; ``outside_plans``: images in no
    plan and not gold; ``checks_to_halve``: further checks expected to halve the current interval.
    """
    group, f, inclusion, drawn, gold = _vendor_design(issues, plans, vendors)
    labels = issues["checked_labels"].fillna("").astype(str).to_numpy() if "checked_labels" in issues \
        else np.full(len(issues), "", dtype=object)
    answered = labels != ""
    in_design = answered & (drawn | gold)
    error = answered & ~label_in_set(issues["given_label"].astype(str).to_numpy(), labels)
    rates = checked_error_rates(f, in_design, error, inclusion, group, len(vendors))
    rows = []
    for g, vendor in enumerate(vendors):
        members = group == g
        outside = int((members & (inclusion <= 0)).sum())
        n_checked = int(rates.n_checked[g])
        combined = n_checked > 0 and outside == 0
        low, high = (rates.low[g], rates.high[g]) if combined else (model_low[g], model_high[g])
        to_halve = _checks_to_halve(f[members], inclusion[members], (high - low) / 2, rates.rate[g],
                                    n_checked if combined else 0, int(rates.checked_errors[g]))
        n_gold = int((members & gold).sum())
        rows.append({
            "vendor": vendor, "n_checked": n_checked, "checked_errors": int(rates.checked_errors[g]),
            "checks_error_rate": rates.checks_rate[g] if combined else np.nan,
            "checks_error_rate_low": rates.checks_low[g] if combined else np.nan,
            "checks_error_rate_high": rates.checks_high[g] if combined else np.nan,
            "combined": combined,
            "combined_rate": rates.rate[g] if combined else np.nan,
            "combined_low": rates.low[g] if combined else np.nan,
            "combined_high": rates.high[g] if combined else np.nan,
            "gold_images": n_gold,
            "gold_accuracy": float((~error[members & gold]).mean()) if n_gold else np.nan,
            "unplanned_checks": int((members & answered & ~in_design).sum()),
            "awaiting_answers": int((members & drawn & ~answered).sum()),
            "outside_plans": outside,
            "checks_to_halve": to_halve,
        })
    return pd.DataFrame(rows, columns=VENDOR_CHECK_COLUMNS)


def _vendor_design(issues: pd.DataFrame, plans: list[Plan], vendors: list[str]) -> tuple[np.ndarray, ...]:
    """Per image of ``issues`` (N,): its vendor's index in ``vendors``, the model's probability of error
    (:func:`model_error`), the probability of having been checked so far (a gold image: 1), whether
    some plan drew it, and whether it is a gold image."""
    group = issues["vendor"].astype(str).map({v: g for g, v in enumerate(vendors)}).to_numpy(np.int64)
    inclusion, drawn, _ = plan_design(issues["image_id"].astype(str).to_numpy(), plans)
    source = issues["check_source"].fillna("").astype(str) if "check_source" in issues \
        else pd.Series([""] * len(issues))
    gold = source.str.startswith("gold/").to_numpy()
    return group, model_error(issues), np.where(gold, 1.0, inclusion), drawn, gold


def checks_for_target(issues: pd.DataFrame, plans: list[Plan], vendors: list[str], rate: np.ndarray,
                      halfwidth: float) -> np.ndarray:
    """(V,) per vendor (``vendors`` order), the further checks one more plan needs for an interval
    expected at +-``halfwidth`` around ``rate`` (V,): what ``vendor-audit plan --halfwidth`` would draw
    (:func:`ml.check_sampling.checks_for_halfwidth`)."""
    group, f, known, _, _ = _vendor_design(issues, plans, vendors)
    return np.array([checks_for_halfwidth(f[group == g], known[group == g], halfwidth, float(rate[g]))
                     for g in range(len(vendors))], np.int64)


def on_the_point(rate: float, point: float) -> bool:
    """Whether ``rate`` is ``point`` at the scorecard's resolution (4 decimals of a fraction): no number of
    checks would move its interval off the point."""
    return round(abs(point - rate), 4) == 0


def checks_to_exclude(issues: pd.DataFrame, plans: list[Plan], vendors: list[str], rate: np.ndarray,
                      low: np.ndarray, high: np.ndarray, point: np.ndarray) -> np.ndarray:
    """(V,) per vendor (``vendors`` order), the further checks one more plan needs for its interval to be
    expected to leave out ``point`` (V,), e.g. a contract's limit; NaN where ``point`` is NaN.

    Parameters
    ----------
    issues : label_issues rows (image_id, vendor, p_error, verdict [, model_verdict, check_source]).
    plans : the recorded plans.
    rate, low, high : (V,) each vendor's current rate and 95% interval (the scorecard's).
    point : (V,) the value to leave out, at a distance ``d = |point - rate|`` from the rate.

    The planner (:func:`ml.check_sampling.checks_for_halfwidth`) sizes the plan whose expected
    half-width is ``d``, measured as :func:`_checks_to_halve` measures (on the interval expected from the
    model, the same yardstick before and after): the expected half-width now, times ``d`` over the
    distance from the rate to the current interval's end on the point's side. At least 1 (the interval
    reaches the point now), at most the vendor's image count. A point on the rate (``d`` 0 at the
    scorecard's 4 decimals) is left out by no number of checks: NaN.
    """
    group, f, known, _, _ = _vendor_design(issues, plans, vendors)
    needed = np.full(len(vendors), np.nan)
    for g in range(len(vendors)):
        if not math.isfinite(point[g]) or on_the_point(float(rate[g]), float(point[g])):
            continue
        distance = abs(float(point[g]) - float(rate[g]))
        members = group == g
        side = float(high[g] - rate[g]) if point[g] > rate[g] else float(rate[g] - low[g])
        expected_low, expected_high = expected_interval(f[members], known[members], float(rate[g]))
        now = (expected_high - expected_low) / 2 if math.isfinite(expected_low) else side
        target = now * distance / side if side > 0 else distance
        checks = checks_for_halfwidth(f[members], known[members], target, float(rate[g]), level=LEVEL)
        needed[g] = min(max(checks, 1), int(members.sum()))
    return needed


def _checks_to_halve(f: np.ndarray, inclusion: np.ndarray, halfwidth: float, rate: float, n_checked: int,
                     errors_found: int) -> int:
    """Further checks (one more plan over these images (N,)) expected to halve the interval.

    Halving is measured on the interval expected from the model (:func:`expected_interval`, the same
    yardstick before and after): the realised ``halfwidth`` also reflects how calibrated the model is,
    and against it the expectation would promise too much (it can even read 0 more checks). Images in
    no plan yet (probability 0) leave only the realised half-width to halve. While fewer than
    MIN_ERRORS_FOR_NORMAL errors are found, the interval is held at the checks-only one, which
    halves with about twice the checks, so at least as many again are asked for."""
    if not halfwidth > 0:
        return 0
    low, high = expected_interval(f, inclusion, rate)
    now = (high - low) / 2 if math.isfinite(low) else halfwidth
    needed = checks_for_halfwidth(f, inclusion, now / 2, rate, level=LEVEL)
    if n_checked and errors_found < MIN_ERRORS_FOR_NORMAL:
        needed = max(needed, n_checked)
    return int(min(needed, len(f)))


def answers_from_truth(to_check: pd.DataFrame, truth: pd.DataFrame, checker: str = "simulated") -> pd.DataFrame:
    """Answers for every image of ``to_check`` (check_plan.csv rows) from a simulation's truth
    (image_id, true_labels): what a perfect checker would write (the demo's checker)."""
    true_labels = truth.set_index("image_id")["true_labels"]
    missing = to_check.loc[~to_check["image_id"].isin(true_labels.index), "image_id"]
    if len(missing):
        raise CheckPlanError(f"the truth has no row for {len(missing)} planned image(s), e.g. {missing.iloc[0]}")
    return pd.DataFrame({"image_id": to_check["image_id"].to_numpy(),
                         "true_labels": true_labels.loc[to_check["image_id"]].to_numpy(),
                         "checker": checker, "checked_at": ""})


# ---- noticing new answers --------------------------------------------------------------------------------


def answers_fingerprint(*folders: Path) -> str:
    """A cheap fingerprint of the answer files in ``folders`` (:func:`ml.checks.answer_files`): their
    names, sizes and modification times, "" when there is none. It changes when a file is added,
    removed or rewritten, without reading any."""
    entries = []
    for folder in folders:
        for path in answer_files(folder):
            stat = path.stat()
            entries.append(f"{folder.name}/{path.name}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest() if entries else ""


def read_answers_state(path: Path) -> dict:
    """The record of the answers last read (``read``) and last scored (``scored``) fingerprints, and the
    DVC versions of checks/, gold/ and plans/ (``versions``); {} when there is none."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # unreadable: as if never scored, so the answers are read again


def write_answers_state(path: Path, **values) -> None:
    """Update the record (:func:`read_answers_state`) with ``values``, atomically."""
    state = {**read_answers_state(path), **values}
    atomic_write_text(path, json.dumps(state, indent=2, sort_keys=True))


def answer_file_rows(folder: Path, key_column: str, suffixes: tuple[str, ...] = CHECK_SUFFIXES) -> int:
    """The rows the answer files hold, counted apart from their validation: the non-blank data rows of
    each readable answer file in ``folder`` (a Label Studio export: its answers and the tasks its
    format rejects; CVAT: its images), and 1 for a file that cannot be read as a whole (it is
    quarantined as one row)."""
    total = 0
    for path in answer_files(folder, suffixes):
        try:
            rows, rejected = read_file_rows(path, key_column, ())
            total += len(rows) + len(rejected)
        except DeliveryError:
            total += 1
    return total
