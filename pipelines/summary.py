"""What a run prints after its log: the scorecard, then the summary of what it read, did and found,
and its exit status."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from ml.delivery import RunSummary


def format_summary(summary: RunSummary, hand_checks: list[str] = (), contract: list[str] = (),
                   basis: list[str] = ()) -> list[str]:
    """The run's summary as plain lines, printed after the scorecard; ``hand_checks``: lines about the
    answers read (:func:`hand_check_lines`); ``contract``: the verdicts against the contract
    (:func:`contract_lines`); ``basis``: the vendors whose figures rest on the model alone
    (:func:`model_only_lines`)."""
    from ml.reliability import UNRELIABLE

    lines = ["summary:"]
    unreliable = sorted(v for v, note in summary.vendor_warnings.items() if UNRELIABLE in note)
    if unreliable:  # first: every figure above rests on it
        lines.append(f"  the error rates of {', '.join(unreliable)} are UNRELIABLE: the classifier cannot measure them "
                     "well (why, and what would help: warnings below, and the report's first lines)")
    if summary.outcomes:
        lines.append(f"  deliveries read in this run: {len(summary.outcomes)} ({len(summary.ingested)} ingested, "
                     f"{len(summary.rejected)} rejected whole)")
    else:
        lines.append("  no new delivery in this run")
    for outcome in summary.ingested:
        reasons = ", ".join(f"{reason} ({count})" for reason, count in outcome.top_reasons)
        lines.append(f"    {outcome.key}: {outcome.n_accepted} rows accepted, {outcome.n_quarantined} quarantined"
                     + (f"; top reasons: {reasons}" if reasons else ""))
    if summary.rejected:
        lines.append("  rejected whole, nothing curated (fix it and deliver again under a new batch name):")
        lines += [f"    {outcome.key}: {outcome.reason}" for outcome in summary.rejected]
    if summary.failed_checks:
        lines.append("  failed checks:")
        lines += [f"    quarantine_share {o.key}: {o.quarantine_share:.1%} of rows quarantined "
                  f"(limit quarantine_warn_share {o.share_limit:.1%})"
                  + (", rejected whole" if o.status == "rejected" else "") for o in summary.failed_checks]
    if summary.vendor_warnings:
        lines.append("  warnings:")
        lines += [f"    vendor {vendor}: {note}" for vendor, note in sorted(summary.vendor_warnings.items())]
    if summary.changed:
        lines.append("  changed after they were read, change ignored (deliver again under a new batch name): "
                     + ", ".join(summary.changed))
    if summary.ignored:
        lines.append("  ignored under landing/ (never opened):")
        lines += [f"    {folder.path}: {folder.reason}" for folder in summary.ignored]
    if summary.waiting:
        lines.append("  waiting for _READY: " + ", ".join(summary.waiting))
    lines += list(hand_checks)
    lines += list(contract)
    lines += list(basis)
    if summary.input_problems:
        lines.append("  some input had problems (exit status 3)")
    return lines


def hand_check_lines(home: Path) -> list[str]:
    """Summary lines about the hand checks the last audit read: answers used, rows quarantined with
    the most frequent reasons; nothing when there are no answer files."""
    from ml.check_plan import answers_fingerprint, chosen_answers, read_answers

    if not answers_fingerprint(home / "checks", home / "gold"):
        return []
    used = chosen_answers(read_answers(home / "reports" / "hand_checks.csv"))
    lines = [f"  hand checks: {len(used)} images checked ({int((used['kind'] == 'gold').sum())} gold), "
             f"{int((~used['correct']).sum())} labels found wrong"]
    for kind in ("checks", "gold"):
        files = sorted((home / "quarantine" / kind).glob("*.csv"))
        if not files:
            continue
        rejected = pd.concat([pd.read_csv(f, dtype=str, keep_default_na=False) for f in files], ignore_index=True)
        reasons = rejected["reason"].str.replace(r"'[^']*'", "'…'", regex=True).value_counts().head(3)
        lines.append(f"    {len(rejected)} rows of {kind}/ quarantined (quarantine/{kind}/); top reasons: "
                     + ", ".join(f"{reason} ({count})" for reason, count in reasons.items()))
    return lines


def contract_lines(scorecard: pd.DataFrame, home: Path, breach_status: bool) -> list[str]:
    """Summary lines about the contract: each vendor's action and why (:func:`ml.contract.verdict_lines`),
    override names that match no vendor, and the vendors in breach, with exit status 4 when
    ``breach_status`` (it is the run's status); nothing when no contract is set."""
    from ml.config import load_settings
    from ml.contract import BREACH, unknown_override_vendors, vendors_by_verdict, verdict_lines

    verdicts = verdict_lines(scorecard)
    if not verdicts:
        return []
    lines = ["  contract:"] + [f"    {head} — {text}" for head, text in verdicts]
    unknown = unknown_override_vendors(scorecard["vendor"].astype(str), load_settings(home).contract_overrides)
    if unknown:
        lines.append(f"    contract_overrides names {', '.join(unknown)}: no such vendor has delivered (a misspelt "
                     "name leaves the real vendor on contract_max_error_rate)")
    breach = vendors_by_verdict(scorecard)[BREACH]
    if breach:
        lines.append(f"  {', '.join(breach)} in breach of the contract" + (" (exit status 4)" if breach_status else ""))
    return lines


def model_only_lines(scorecard: pd.DataFrame) -> list[str]:
    """Summary lines about the rated vendors whose figures rest on the model alone: what such a figure
    leaves out (:data:`ml.contract.MODEL_ONLY_CAVEAT`) and, per vendor, the planned checks that would make
    its verdict check-based (:func:`ml.contract.basis_lines`); nothing when every rated vendor's rate
    combines hand checks."""
    from ml.contract import MODEL_ONLY_CAVEAT, basis_lines

    lines = basis_lines(scorecard)
    return [f"  {MODEL_ONLY_CAVEAT}"] + [f"    {line}" for line in lines] if lines else []


def run_status(*statuses: int) -> int:
    """One exit status for several outcomes: 3 (this run's input had problems) before 4 (a vendor in
    breach): a breach lasts and is reported again at the next run, a problem of this run's input is not."""
    return 3 if 3 in statuses else max(statuses)


def with_truth(scorecard: pd.DataFrame, home: Path) -> pd.DataFrame:
    """Add the simulation's true error rate per vendor when ``home/truth.csv`` exists."""
    truth_path = home / "truth.csv"
    if not truth_path.is_file():
        return scorecard
    truth = pd.read_csv(truth_path, dtype=str, keep_default_na=False)
    issues = pd.read_csv(home / "reports" / "label_issues.csv", dtype=str, keep_default_na=False)
    if "true_labels" not in truth.columns:  # a truth file with one true label per image
        truth["true_labels"] = truth["true_label"]
    merged = issues.merge(truth[["image_id", "true_labels"]], on="image_id", how="inner")
    # the given label is wrong only when it is outside the set of true labels (ambiguous images)
    wrong = [given not in labels.split("|") for given, labels in zip(merged["given_label"], merged["true_labels"])]
    true_rate = pd.Series(wrong, index=merged.index).groupby(merged["vendor"]).mean().round(4)
    return scorecard.assign(true_error_rate=scorecard["vendor"].map(true_rate))


def print_scorecard(scorecard: pd.DataFrame, wide: bool = False) -> None:
    """The scorecard on the console: the contract's columns, ``status``, ``basis`` and the simulation's
    true rate when known (``wide``: every column); empty cells blank, not NaN. The notes are in the
    summary."""
    from ml.scorecard import SCORECARD_COLUMNS

    shown = scorecard if wide else scorecard[[c for c in (*SCORECARD_COLUMNS, "status", "basis", "true_error_rate")
                                              if c in scorecard.columns]]
    print(shown.to_string(index=False, na_rep=""))
