"""The vendor scorecard, pairwise comparisons and the report, from the label issues."""

import json
from datetime import datetime, timezone

import dagster as dg
import numpy as np
import pandas as pd

from assets.scoring import _require_champion, _table, label_issues
from ml.audit import load_audit
from ml.check_plan import checks_for_target, read_answers_state, read_plans, vendor_checks, write_answers_state
from ml.contract import (
    BREACH, UNDECIDED, WITHIN, got_worse, unknown_override_vendors, vendor_limits, vendors_by_verdict, verdict_lines,
    with_contract,
)
from ml.deliveries import with_worsening
from ml.files import atomic_write_bytes, atomic_write_csv
from ml.history import read_history, with_audit, write_history
from ml.reliability import HAND_CHECK_HALFWIDTH, assess_reliability, what_would_help
from ml.report import build_report, likely_errors, load_issue_images, read_quarantine, write_report
from ml.scorecard import build_scorecard, checks_last, compare_vendors, read_scorecard
from ml.wording import count
from pipelines.locks import DVC_POOL
from pipelines.resources import AuditHome, DvcRepo, MlflowTracking


@dg.asset(
    deps=[label_issues],
    group_name="vendor_audit",
    kinds={"pandas", "mlflow"},
    pool=DVC_POOL,
    # declarative: whatever refreshed the label issues (a job, the UI), the scorecard follows once the
    # scorecard_automation sensor is on; no job or sensor has to name it
    automation_condition=dg.AutomationCondition.eager(),
    description="One row per vendor: error rate with a 95% interval (combined with the hand checks where a vendor "
                "has them, and what it rests on: checked or model only), flagged and ambiguous counts, rank, hand-check and gold columns, the verdict against "
                "the contract (pay, warn or drop); "
                "pairwise comparisons; the scorecard appended to the audits' history (history/scorecards.parquet, "
                "DVC-versioned), and the report for vendor managers (reports/report.md and a "
                "self-contained report.html).",
)
def vendor_scorecard(context: dg.AssetExecutionContext, audit_home: AuditHome, dvc: DvcRepo,
                     mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    settings = audit_home.settings()
    champion = _require_champion(mlflow_tracking)
    saved = load_audit(audit_home.reports / "audit.npz")
    vendors, rates, confusion, baseline_rates = saved.vendors, saved.rates, saved.confusion, saved.baseline_rates
    issues = pd.read_csv(audit_home.reports / "label_issues.csv", dtype=str, keep_default_na=False)
    vendor_index = issues["vendor"].map({v: i for i, v in enumerate(vendors)}).to_numpy(np.int64)
    dataset_version = dvc.version_of("curated")
    answers_state = read_answers_state(audit_home.checks_state)
    checks_version = answers_state.get("versions", {}).get("checks", "")
    plans = read_plans(audit_home.plans)
    checks = vendor_checks(issues, plans, vendors, rates.low, rates.high)
    reliability = assess_reliability(rates, saved.heldout_accuracy, len(settings.classes),
                                     combined=checks["combined"].to_numpy(bool))
    remedies = []
    if reliability.unreliable.any():  # the check count costs a bisection per vendor: only when it is said
        needed = checks_for_target(issues, plans, vendors, rates.rate, HAND_CHECK_HALFWIDTH)
        remedies = what_would_help(champion.get("backbone", ""), int(needed[reliability.unreliable].max()))
    scorecard = build_scorecard(vendors, vendor_index, issues["verdict"].to_numpy(), rates, checks=checks,
                                reliability=reliability, remedies=remedies)
    worsening_path = audit_home.reports / "worsening.csv"
    if worsening_path.is_file():  # written with the label issues (an audit of an earlier release has none)
        scorecard = with_worsening(scorecard, pd.read_csv(worsening_path, dtype={"vendor": str}))
    scorecard = checks_last(scorecard.assign(
        cleanlab_error_rate=scorecard["vendor"].map(dict(zip(vendors, baseline_rates.round(4)))),
        dataset_version=dataset_version, model_version=champion["model_version"])).assign(
        checks_version=checks_version)
    overrides = settings.contract_overrides
    scorecard = with_contract(scorecard, vendor_limits(vendors, settings.contract_max_error_rate, overrides),
                              issues, plans)
    for name in unknown_override_vendors(vendors, overrides):
        context.log.warning(f"contract_overrides names vendor {name!r}, which has delivered nothing: a misspelt name "
                            "leaves the real vendor on contract_max_error_rate")
    comparisons = compare_vendors(vendors, rates, checks=checks)
    reports = audit_home.reports
    atomic_write_csv(reports / "scorecard.csv", scorecard)
    atomic_write_csv(reports / "comparisons.csv", comparisons)
    generated_at = datetime.now(timezone.utc)
    history_path = audit_home.history / "scorecards.parquet"
    history = read_history(history_path)
    # a past dataset version checked out re-computes history: it is shown, not added to the table
    if dvc.checked_out_version() is None:
        history = with_audit(history, scorecard, generated_at.isoformat(timespec="seconds"))
        write_history(history_path, history)
        dvc.snapshot_history()
    deliveries_path = reports / "deliveries.csv"
    deliveries = pd.read_csv(deliveries_path, dtype={"vendor": str, "delivery": str}, keep_default_na=False,
                             na_values=[""]) if deliveries_path.is_file() else None
    provenance = {"dataset_version": dataset_version,
                  "model": f"{mlflow_tracking.registered_model} v{champion['model_version']}",
                  "model_version": champion["model_version"], "model_trained_on": champion["dataset_version"],
                  "head": champion["head"], "mlflow_run": champion["run_id"],
                  **{f"{folder}_version": version for folder, version in answers_state.get("versions", {}).items()},
                  # the label issues' worsening test used it: `run` re-scores when the setting changes
                  **({"worsening_window_days": settings.worsening_window_days}
                     if settings.worsening_window_days is not None else {})}
    annotators_path = reports / "annotators.csv"
    report = build_report(
        scorecard, comparisons, issues, confusion, vendors, settings.classes,
        {**provenance, "generated_at": generated_at.strftime("%Y-%m-%d %H:%M UTC")},
        images=load_issue_images(audit_home.curated, likely_errors(issues)),
        quarantined=read_quarantine(audit_home.quarantine), quarantine_warn_share=settings.quarantine_warn_share,
        n_boot=rates.bootstrap.shape[0],
        annotators=pd.read_csv(annotators_path) if annotators_path.is_file() else None, hand_checks=checks,
        reliability=reliability, remedies=remedies, deliveries=deliveries, history=history)
    write_report(reports, report)
    atomic_write_bytes(reports / "provenance.json", json.dumps(provenance, indent=2).encode())
    dvc.commit_stage()  # the home's pipeline (ingest, audit) as it stands now
    dvc.record_audit(dataset_version, f"{mlflow_tracking.registered_model} v{champion['model_version']}")
    # the scorecard now reflects the answers hand_checks read: `run` and checks_sensor compare with this
    write_answers_state(audit_home.checks_state, scored=answers_state.get("read", ""))
    mlflow = mlflow_tracking.start()
    with mlflow.start_run(run_id=champion["run_id"]):
        mlflow.log_artifacts(str(reports), artifact_path="audit-report")
    # one line: the table itself is this materialization's metadata, and `run` prints it once
    vendors = count(len(scorecard), "vendor")
    context.log.info(f"scorecard of {vendors}: {reports / 'scorecard.csv'}; report: {reports / 'report.md'}")
    return dg.MaterializeResult(metadata={
        "scorecard": _table(scorecard),
        "hand_checks": _table(checks),
        "comparisons": _table(comparisons),
        "report": dg.MetadataValue.md(report.markdown),
        **provenance,
    })


@dg.asset_check(asset=vendor_scorecard, description="No vendor breaches its contract (contract_max_error_rate, "
                "contract_overrides), none is undecided and none got worse: WARN while some are undecided or got "
                "worse (their newest delivery against their earlier ones), ERROR when some breach; passes when no "
                "vendor got worse and no contract is set.")
def within_contract(audit_home: AuditHome) -> dg.AssetCheckResult:
    scorecard = read_scorecard(audit_home.reports / "scorecard.csv")
    by_verdict = vendors_by_verdict(scorecard)
    worse = got_worse(scorecard)
    worse_vendors = scorecard.loc[worse != "", "vendor"].astype(str).tolist()
    if not any(by_verdict.values()) and not worse_vendors:
        return dg.AssetCheckResult(passed=True, description="no vendor got worse; no contract set "
                                                            "(contract_max_error_rate, contract_overrides)")
    breach, undecided = by_verdict[BREACH], by_verdict[UNDECIDED]
    said = ([f"{', '.join(breach)} in breach of the contract (drop)"] if breach else []) + \
        ([f"{', '.join(undecided)} undecided (warn)"] if undecided else []) + \
        [f"{vendor} {text} (warn)" for vendor, text in zip(scorecard["vendor"].astype(str), worse) if text]
    return dg.AssetCheckResult(
        passed=not (breach or undecided or worse_vendors),
        severity=dg.AssetCheckSeverity.ERROR if breach else dg.AssetCheckSeverity.WARN,
        description="; ".join(said) or "every vendor within its contract (pay)",
        metadata={"breach": breach, "undecided": undecided, "within": by_verdict[WITHIN], "got_worse": worse_vendors,
                  "verdicts": dg.MetadataValue.md("\n".join(f"- **{head}** — {text}"
                                                            for head, text in verdict_lines(scorecard)))},
    )
