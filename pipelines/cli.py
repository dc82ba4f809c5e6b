"""``vendor-audit``: simulate deliveries, run the audit, open the UIs, benchmark."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pandas as pd

from ml.wording import count

if TYPE_CHECKING:
    from ml.delivery import RunSummary

DEFAULT_VENDORS = "a=0.0,b=0.05,c=0.2"
DAGSTER_YAML = """\
telemetry:
  enabled: false
nux:
  enabled: false  # the UI's "join the community" pop-up, which loads a page from the internet
concurrency:
  pools:
    default_limit: 1  # any pool without its own limit; 'dvc' and 'training' are set from pipelines/locks.py
python_logs:
  managed_python_loggers: [ml]
  python_log_level: INFO
"""

log = logging.getLogger("vendor_audit")


# commands that read an existing home; simulate, demo and the benchmarks create theirs
NEEDS_HOME = ("run", "plan", "datasets", "checkout", "automation", "ui", "mlflow-ui", "screenshots")


def default_home() -> Path:
    return Path(os.environ.get("VENDOR_AUDIT_HOME") or Path.cwd() / "home")


def require_home(home: Path, settings_file: bool = False) -> None:
    """Stop with a usage error (exit 2) naming the commands that create a home, when ``home`` is not a
    folder, or, with ``settings_file``, has no settings file; nothing is created."""
    from ml.config import CONFIG_NAME

    create = (f"create one with vendor-audit init --home {home} --classes NAME,NAME,... (for your deliveries), "
              f"vendor-audit simulate --home {home} (simulated deliveries) or vendor-audit demo --home {home} "
              f"(simulate and audit)")
    if not home.is_dir():
        raise ValueError(f"{home}: no such vendor-audit home: {create}")
    if settings_file and not (home / CONFIG_NAME).is_file():
        raise ValueError(f"{home} is not a vendor-audit home (no {CONFIG_NAME}): {create}")


def open_instance(home: Path):
    """The home's Dagster instance (SQLite storage under ``home/dagster``), the one ``vendor-audit ui`` (dg dev) shows."""
    import dagster as dg

    from pipelines.locks import declare_pools

    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.is_file():
        config.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    declare_pools(instance)
    return instance


@dataclass
class AuditRun:
    """What ``run`` produced: the scorecard (None when no delivery is curated yet) and the facts for
    its summary."""

    scorecard: pd.DataFrame | None
    summary: RunSummary


def run_audit(home: Path, retrain: bool = False) -> pd.DataFrame:
    """Ingest and score every new complete delivery, then refresh the scorecard; train when there is
    no model yet or ``retrain`` is asked. Returns the scorecard."""
    from ml.delivery import DeliveryError

    done = audit(home, retrain)
    if done.scorecard is None:
        raise DeliveryError(f"{home / 'landing'}: nothing to audit: no delivery is curated yet")
    return done.scorecard


def audit_lock(home: Path):
    """One audit of ``home`` at a time, across processes: a second ``run`` (a batch landing mid-run, the
    schedule) waits, then finds what the first left to do; ``plan`` and ``checkout`` take it too, so
    they never run under an audit."""
    from pipelines.locks import exclusive

    return exclusive(home / ".locks" / "run.lock", f"the audit of {home}")


def audit(home: Path, retrain: bool = False, debug: bool = False, ingest_only: bool = False,
          rescore: bool = False) -> AuditRun:
    """:func:`run_audit` with the run's summary; ``debug`` keeps Dagster's tracebacks and DEBUG events;
    ``ingest_only`` stops after ingesting and versioning the data (no scorecard: the ``ingest`` stage
    of the home's dvc.yaml)."""
    from ml.config import load_settings

    load_settings(home)  # a missing or invalid settings file stops here, before anything runs
    with audit_lock(home):
        return _audit_locked(home, retrain, debug, ingest_only, rescore)


def _audit_locked(home: Path, retrain: bool, debug: bool, ingest_only: bool = False,
                  rescore: bool = False) -> AuditRun:
    from ml.config import CONFIG_NAME, load_settings
    from ml.delivery import (
        Delivery, changed_deliveries, check_taxonomy, delivery_outcome, has_curated, is_ingested, load_curated_rows,
        parse_key, scan_landing, summarize_run,
    )
    from pipelines.store import champion_outputs
    from pipelines.automation import answers_changed, new_deliveries, pending_deliveries
    from pipelines.definitions import build_definitions
    from pipelines.resources import AuditHome, DvcRepo, MlflowTracking

    settings = load_settings(home)
    audit_home = AuditHome(home=str(home))
    # curated labels and trained models speak the recorded class list: refuse before any work
    check_taxonomy(audit_home.curated, settings.classes, home / CONFIG_NAME)
    instance = open_instance(home)
    defs = build_definitions(str(home))
    dvc = DvcRepo(audit_home=audit_home)
    scorecard_path = home / "reports" / "scorecard.csv"

    def summary(keys=(), changed=()):
        """What this run read (deliveries ``keys``), did and found, for the closing summary."""
        return summarize_run(list(keys), audit_home.landing, audit_home.curated, audit_home.quarantine,
                             audit_home.delivery_state, settings.quarantine_warn_share, scorecard_path, list(changed))

    restored = dvc.checked_out_version()
    if restored is not None and ingest_only:
        log.warning("dataset version %s is checked out (vendor-audit checkout): nothing is ingested", restored)
        return AuditRun(None, summary())
    if restored is not None:  # a past dataset version: audit exactly that data, ingest nothing new
        log.warning("dataset version %s is checked out (vendor-audit checkout): re-scoring it without ingesting "
                    "new deliveries; vendor-audit checkout --home %s --dataset-version latest returns to the latest",
                    restored, home)
        _execute(defs, "score_vendors", instance, debug)
        return AuditRun(pd.read_csv(scorecard_path), summary())
    for ignored in scan_landing(audit_home.landing).ignored:
        log.warning("landing/%s ignored: %s", ignored.path, ignored.reason)
    added = new_deliveries(instance, audit_home)
    if added:
        instance.add_dynamic_partitions("deliveries", added)
    keys = pending_deliveries(audit_home)  # new ones, and any whose ingestion was interrupted

    def execute(job_name: str, **kwargs) -> None:
        _execute(defs, job_name, instance, debug, **kwargs)

    def delivery_of(key: str) -> Delivery:
        vendor, batch = parse_key(key)
        return Delivery(vendor, batch, audit_home.landing / vendor / batch)

    for number, key in enumerate(keys, start=1):
        log.info("ingesting delivery %s (%d of %d)", key, number, len(keys))
        execute("ingest_deliveries", partition_key=key)
        delivery = delivery_of(key)
        outcome = delivery_outcome(delivery, audit_home.quarantine, audit_home.delivery_state,
                                   settings.quarantine_warn_share)
        if outcome is not None and outcome.status == "rejected":
            log.warning("delivery %s rejected whole (quarantine/%s/%s.csv): %s", key, delivery.vendor, delivery.batch,
                        outcome.reason)
        elif outcome is not None and outcome.check_failed:
            log.warning("delivery %s: %.1f%% of its rows quarantined (quarantine_warn_share %.1f%%)", key,
                        100 * outcome.quarantine_share, 100 * outcome.share_limit)
    changed = changed_deliveries(audit_home.landing, audit_home.curated, audit_home.delivery_state)
    for key in changed:
        log.error("delivery %s changed in the landing folder after it was read: the change is ignored "
                  "(ingested rows are never replaced); deliver it again under a new batch name", key)
    if ingest_only:  # version what was read; the audit stage scores it
        if has_curated(audit_home.curated):
            version, commit = dvc.snapshot_dataset(load_curated_rows(audit_home.curated))
            log.info("dataset version %s%s", version, f" (commit {commit[:8]})" if commit else "")
        dvc.snapshot_folders(dvc.answer_folders())
        return AuditRun(None, summary(keys, changed))
    if not has_curated(audit_home.curated):
        return AuditRun(None, summary(keys, changed))
    curated_now = [key for key in keys if is_ingested(delivery_of(key), audit_home.curated)]
    champion = MlflowTracking(audit_home=audit_home).champion()
    has_model = champion is not None
    rescored = []
    if has_model and not retrain:  # deliveries whose scoring failed earlier (the model store was down...)
        rows = load_curated_rows(audit_home.curated)
        for key in champion_outputs(audit_home.root, champion, rows)[2]:
            log.info("scoring delivery %s with the champion model v%s", key, champion["model_version"])
            execute("ingest_deliveries", partition_key=key)
            rescored.append(key)
    if retrain or not has_model:
        log.info("auditing: dataset snapshot, training, label issues, scorecard")
        config = {"ops": {"cv_models": {"config": {"force": retrain}}}}
        execute("audit_vendors", run_config=config)
    elif rescore or curated_now or rescored or not scorecard_path.is_file() or _scored_another_version(audit_home, dvc):
        log.info("scoring with the champion model: dataset snapshot, label issues, scorecard")
        execute("score_vendors")
    elif answers_changed(audit_home):
        log.info("hand checks changed under %s or %s: re-scoring (no retraining)", audit_home.checks, audit_home.gold)
        execute("score_vendors")
    elif _contract_changed(scorecard_path, settings):
        log.info("the contract changed in %s: re-scoring (no retraining)", home / CONFIG_NAME)
        execute("score_vendors")
    else:
        log.info("no new curated delivery under %s: the scorecard is current", home / "landing")
    return AuditRun(pd.read_csv(scorecard_path), summary(keys, changed))


def _contract_changed(scorecard_path: Path, settings) -> bool:
    """Whether the contract's limits in ``settings`` differ from those the scorecard's verdicts were
    drawn against (a contract set, edited or removed since the last audit)."""
    from ml.contract import limits_changed, vendor_limits
    from ml.scorecard import read_scorecard

    scorecard = read_scorecard(scorecard_path)
    limits = vendor_limits(scorecard["vendor"], settings.contract_max_error_rate, settings.contract_overrides)
    return limits_changed(scorecard, limits)


def _scored_another_version(audit_home, dvc) -> bool:
    """Whether the reports were written for another dataset version than the one in curated/ (after
    ``vendor-audit checkout`` back to the latest, say)."""
    import json

    provenance = audit_home.reports / "provenance.json"
    if not provenance.is_file() or not (audit_home.root / "curated.dvc").is_file():
        return False
    scored = json.loads(provenance.read_text()).get("dataset_version")
    return scored != dvc.version_of("curated")


def _execute(defs, job_name: str, instance, debug: bool, run_config: dict | None = None, **kwargs) -> None:
    """Run a job of the Definitions in this process. Its console log shows a failure as one line (the
    error), not the Dagster traceback, unless ``debug``; the instance's event log keeps everything."""
    import dagster as dg

    def console(_init_context) -> logging.Logger:
        logger = logging.Logger("dagster", logging.DEBUG if debug else logging.INFO)
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s - dagster - %(levelname)s - %(message)s"))
        if not debug:
            handler.addFilter(_without_stack_trace)
        logger.addHandler(handler)
        return logger

    job = defs.resolve_job_def(job_name).with_logger_defs(
        {"console": dg.LoggerDefinition(console, description="console, tracebacks only with --debug")})
    # a job's loggers are only started when the run config names them
    from pipelines.locks import process_tags, release_abandoned_runs

    release_abandoned_runs(instance)  # a killed run's pool slot would make this one wait forever
    with _through_dagster_only("ml"):
        job.execute_in_process(instance=instance, run_config={**(run_config or {}), "loggers": {"console": {}}},
                               tags={**kwargs.pop("tags", {}), **process_tags()}, **kwargs)


@contextmanager
def _through_dagster_only(*names: str) -> Iterator[None]:
    """Detach this CLI's own console handlers from these loggers for the block, and stop their lines
    from reaching the root logger: during a run, Dagster's managed python loggers (``managed_python_loggers``
    in dagster.yaml) carry them to the run's console logger and event log, and any second handler
    (ours with --debug, or one a library puts on the root logger) would print each line twice."""
    detached, propagation = [], {}
    for name in names:
        logger = logging.getLogger(name)
        propagation[name] = logger.propagate
        logger.propagate = False
        for handler in [h for h in logger.handlers if getattr(h, "vendor_audit", False)]:
            logger.removeHandler(handler)
            detached.append((logger, handler))
    try:
        yield
    finally:
        for logger, handler in detached:
            logger.addHandler(handler)
        for name, propagate in propagation.items():
            logging.getLogger(name).propagate = propagate


def _without_stack_trace(record: logging.LogRecord) -> bool:
    """Shorten a Dagster failure event to its first line and the error (``ValueError: ...``)."""
    message = record.getMessage()
    if "Stack Trace:" in message:
        paragraphs = [p.strip() for p in message.split("Stack Trace:")[0].split("\n\n") if p.strip()]
        error = paragraphs[-1].splitlines()[-1] if len(paragraphs) > 1 else ""
        record.msg = " ".join(filter(None, [paragraphs[0], error, "(--debug shows the traceback)"]))
        record.args = ()
    return True


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


def _simulate(args) -> None:
    from ml.datasets import load_dataset
    from ml.simulate import parse_vendor_rates, simulate_deliveries

    data = load_dataset(args.dataset, args.source)
    truth = simulate_deliveries(data, parse_vendor_rates(args.vendors), args.per_vendor, args.home,
                                seed=args.seed, batch=args.batch, noise=args.noise, ambiguous=args.ambiguous)
    log.info("wrote %s for %s under %s", count(len(truth), "image"), count(truth["vendor"].nunique(), "vendor"),
             args.home / "landing")


def _init(args) -> int:
    """A new home for real deliveries: the commented settings file with the given classes, and landing/."""
    from ml.config import CONFIG_NAME, make_settings, write_settings

    settings_path = args.home / CONFIG_NAME
    if settings_path.exists():
        raise ValueError(f"{settings_path} exists already: {args.home} is a vendor-audit home (edit that file to "
                         "change its settings)")
    settings = make_settings("--classes", classes=args.classes.split(","))
    (args.home / "landing").mkdir(parents=True, exist_ok=True)
    write_settings(args.home, settings)
    open_instance(args.home)  # its Dagster instance, so that dagster's own command lines work on it at once
    print(f"new home {args.home}: settings in {settings_path} ({count(len(settings.classes), 'class')}; every "
          f"setting is explained there)\n"
          f"deliveries go to {args.home / 'landing'}/<vendor>/<batch>/: labels.csv (image,label), the images, and "
          f"_READY written last\nthen: vendor-audit run --home {args.home}")
    return 0


def print_scorecard(scorecard: pd.DataFrame, wide: bool = False) -> None:
    """The scorecard on the console: the contract's columns, ``status``, ``basis`` and the simulation's
    true rate when known (``wide``: every column); empty cells blank, not NaN. The notes are in the
    summary."""
    from ml.scorecard import SCORECARD_COLUMNS

    shown = scorecard if wide else scorecard[[c for c in (*SCORECARD_COLUMNS, "status", "basis", "true_error_rate")
                                              if c in scorecard.columns]]
    print(shown.to_string(index=False, na_rep=""))


def _demo(args) -> int:
    """``simulate`` and ``run``; with ``--checks N``, then a plan of N checks per vendor answered from the
    simulation's truth into checks/demo.csv, and ``run`` again."""
    if args.checks is not None and args.checks < 1:
        raise ValueError(f"--checks must be a number of checks per vendor >= 1 (got {args.checks})")
    _simulate(args)
    args.retrain = False
    status = _run(args)
    if args.checks is None:
        return status
    check_plan = make_plan(args.home, budget=args.checks)
    _print_plan(args.home, check_plan)
    path = answer_demo_checks(args.home, check_plan.to_check)
    print(f"\nanswered {len(check_plan.to_check)} planned images from the simulated truth: {path}\n")
    return run_status(status, _run(args))


def make_plan(home: Path, budget: float | None = None, halfwidth: float | None = None):
    """Draw and write the next check plan of ``home`` from its current audit (see ``vendor-audit plan``);
    returns the :class:`ml.check_plan.CheckPlan`."""
    from ml.check_plan import (
        CheckPlanError, check_plan_markdown, collect_answers, draw_check_plan, read_plans, write_check_plan,
    )
    from ml.checks import read_checks, read_gold
    from ml.config import load_settings
    from ml.delivery import load_curated_rows
    from ml.report import load_issue_images
    from pipelines.resources import AuditHome, DvcRepo

    settings = load_settings(home)
    issues_path = home / "reports" / "label_issues.csv"
    # the audit rewrites label_issues.csv and the plan numbers must not collide: one at a time
    with audit_lock(home):
        if not issues_path.is_file():
            raise CheckPlanError(f"{issues_path}: no audit yet: run vendor-audit run --home {home} first; the plan "
                                 "is drawn from its per-image probabilities of error")
        issues = pd.read_csv(issues_path, dtype=str, keep_default_na=False)
        rows = load_curated_rows(home / "curated")
        rows = rows[rows["image_id"].isin(issues["image_id"])]
        checks, _ = read_checks(home / "checks", settings.classes, pd.Index(issues["image_id"]))
        gold, _ = read_gold(home / "gold", settings.classes)
        answers = collect_answers(rows, checks, gold)
        scorecard_path = home / "reports" / "scorecard.csv"
        current = (pd.read_csv(scorecard_path).set_index("vendor")["error_rate"].to_dict()
                   if scorecard_path.is_file() else None)
        check_plan = draw_check_plan(issues, set(answers["image_id"]),
                                     set(answers.loc[answers["kind"] == "gold", "image_id"]),
                                     read_plans(home / "plans"), budget=budget, halfwidth=halfwidth,
                                     current_rate=current)
        listed = issues[issues["image_id"].isin(check_plan.to_check["image_id"])]
        markdown, files = check_plan_markdown(check_plan, load_issue_images(home / "curated", listed))
        write_check_plan(home / "plans", home / "reports", check_plan, markdown, files)
        # the plan is the record of the design the estimate relies on: versioned as soon as it exists
        DvcRepo(audit_home=AuditHome(home=str(home))).snapshot_folders(["plans"])
    return check_plan


def answer_demo_checks(home: Path, to_check: pd.DataFrame) -> Path:
    """Answer every image of ``to_check`` from ``home/truth.csv`` into ``home/checks/demo.csv`` (added to
    the answers already there): the demo's perfect checker. Returns the file's path."""
    from ml.check_plan import answers_from_truth
    from ml.files import atomic_write_csv
    from ml.simulate import TRUTH_FILE

    truth_path = home / TRUTH_FILE
    if not truth_path.is_file():
        raise FileNotFoundError(f"{truth_path}: no simulated truth to answer the checks from")
    answers = answers_from_truth(to_check, pd.read_csv(truth_path, dtype=str, keep_default_na=False))
    path = home / "checks" / "demo.csv"
    if path.is_file():
        earlier = pd.read_csv(path, dtype=str, keep_default_na=False)
        answers = pd.concat([earlier, answers[~answers["image_id"].isin(earlier["image_id"])]], ignore_index=True)
    atomic_write_csv(path, answers)
    return path


def _print_plan(home: Path, check_plan) -> None:
    shown = check_plan.vendors.copy()
    for column in ("error_rate", "expected_low", "expected_high"):
        shown[column] = shown[column].map(lambda x: f"{100 * x:.1f}%" if pd.notna(x) else "n/a")
    print(f"check plan {check_plan.number:03d}: {home / 'plans' / f'plan-{check_plan.number:03d}.csv'}")
    print(shown.rename(columns={"n_images": "images", "to_check": "to_check_now", "error_rate": "rate_now",
                                "expected_low": "expected_95%_low", "expected_high": "expected_95%_high"})
          .to_string(index=False))
    print(f"\n{len(check_plan.to_check)} images to check: {home / 'reports' / 'check_plan.csv'} "
          f"(thumbnails: {home / 'reports' / 'check_plan.md'})")
    print(f"answers: {home / 'checks'}/<name>.csv with columns image_id,true_labels (several classes: a|b), "
          f"then vendor-audit run --home {home}")


def _plan(args) -> int:
    _print_plan(args.home, make_plan(args.home, budget=args.budget, halfwidth=args.halfwidth))
    return 0


def _run(args) -> int:
    """Exit status 0: all well; 3: the audit finished but some input had problems; 4: the audit finished
    and some vendor is in breach of its contract (unless ``--no-breach-status``; 3 comes first)."""
    from ml.contract import BREACH, vendors_by_verdict
    from ml.delivery import DeliveryError

    ingest_only = getattr(args, "ingest_only", False)
    done = audit(args.home, retrain=args.retrain, debug=args.debug, ingest_only=ingest_only,
                 rescore=getattr(args, "rescore", False))
    if ingest_only:
        print("\n".join(format_summary(done.summary)))
        return 3 if done.summary.input_problems else 0
    if done.scorecard is not None:
        print_scorecard(with_truth(done.scorecard, args.home), wide=getattr(args, "wide", False))
    else:
        print("no scorecard: no delivery is curated yet")
    breach = done.scorecard is not None and bool(vendors_by_verdict(done.scorecard)[BREACH])
    breach_status = breach and not getattr(args, "no_breach_status", False) and not done.summary.input_problems
    contract, basis = (contract_lines(done.scorecard, args.home, breach_status), model_only_lines(done.scorecard)) \
        if done.scorecard is not None else ([], [])
    print("\n" + "\n".join(format_summary(done.summary, hand_check_lines(args.home), contract, basis)))
    reports = args.home / "reports"
    if done.scorecard is not None:  # last, where the eye lands: the files to open
        print(f"\ntables: {reports} (scorecard.csv, label_issues.csv, comparisons.csv)\n"
              f"report: {reports / 'report.md'}\n        {reports / 'report.html'}")
    if done.summary.input_problems:
        return 3
    if done.scorecard is None:
        raise DeliveryError(f"{args.home / 'landing'}: nothing to audit: no delivery is curated yet "
                            "(a complete delivery ends with a _READY file)")
    return 4 if breach_status else 0


def dataset_versions(home: Path) -> list[dict]:
    """Every dataset version recorded in the home's git, oldest first: ``dataset_version``, ``commit``,
    ``date``, ``n_images``, ``deliveries`` ({vendor/batch: images}), ``added`` (deliveries new in this
    version), ``models`` (registered versions trained on it: model_version, head, champion) and
    ``scorecards`` (audit commits of it: commit, date, subject)."""
    from pipelines.resources import AuditHome, DvcRepo, MlflowTracking

    audit_home = AuditHome(home=str(home))
    dvc = DvcRepo(audit_home=audit_home)
    history = dvc.history()
    models = _registered_models(MlflowTracking(audit_home=audit_home)) if (home / "mlflow").is_dir() else []
    versions, before = [], {}
    for entry in history:
        if entry["kind"] != "dataset":
            continue
        manifest = dvc.manifest(entry["commit"]) or {}
        deliveries = manifest.get("deliveries", {})
        version = entry["dataset_version"]
        versions.append({
            "dataset_version": version, "commit": entry["commit"], "date": entry["date"],
            "n_images": manifest.get("n_images", sum(deliveries.values())), "deliveries": deliveries,
            "added": [key for key in deliveries if key not in before],
            "models": [m for m in models if m["dataset_version"] == version],
            "scorecards": [e for e in history if e["kind"] == "audit" and e["dataset_version"] == version],
        })
        before = deliveries
    return versions


def _registered_models(tracking) -> list[dict]:
    """The registered versions of the classifier: model_version, dataset_version, head, champion."""
    mlflow = tracking.start()
    client = mlflow.MlflowClient()
    champion = tracking.champion()
    found = []
    for version in client.search_model_versions(f"name='{tracking.registered_model}'"):
        found.append({"model_version": str(version.version), "dataset_version": version.tags.get("dataset_version", ""),
                      "head": version.tags.get("head", ""),
                      "champion": champion is not None and champion["model_version"] == str(version.version)})
    return sorted(found, key=lambda m: int(m["model_version"]))


def _datasets(args) -> int:
    from pipelines.resources import AuditHome, DvcRepo

    versions = dataset_versions(args.home)
    if not versions:
        print(f"no dataset version recorded in {args.home} yet: vendor-audit run --home {args.home} makes the first")
        return 0
    current = DvcRepo(audit_home=AuditHome(home=str(args.home))).checked_out_version() or versions[-1]["dataset_version"]
    for number, version in enumerate(versions, start=1):
        marker = "  <- in curated/ now" if version["dataset_version"] == current else ""
        print(f"{number}. dataset {version['dataset_version']}  commit {version['commit'][:8]}  "
              f"{version['date'][:16].replace('T', ' ')}  {version['n_images']} images, "
              f"{len(version['deliveries'])} deliveries{marker}")
        print("   deliveries: " + ", ".join(f"{key} ({n})" + (" new" if key in version["added"] else "")
                                          for key, n in version["deliveries"].items()))
        models = [f"v{m['model_version']} {m['head']}" + (" (champion)" if m["champion"] else "")
                  for m in version["models"]]
        print("   models trained on it: " + (", ".join(models) or "none"))
        cards = [f"{c['commit'][:8]} ({c['subject'].split(': ', 1)[1]})" for c in version["scorecards"]]
        print("   scorecards: " + (", ".join(cards) or "none"))
    print(f"\nrestore one: vendor-audit checkout --home {args.home} --dataset-version VERSION (a prefix is enough); "
          f"show a scorecard: git -C {args.home} show COMMIT:reports/scorecard.csv")
    return 0


def _checkout(args) -> int:
    from pipelines.resources import AuditHome, DvcRepo

    dvc = DvcRepo(audit_home=AuditHome(home=str(args.home)))
    with audit_lock(args.home):  # not under a running audit
        version = dvc.checkout_dataset(args.dataset_version)
    if dvc.checked_out_version() is None:
        print(f"dataset {version} (the latest) is in {args.home / 'curated'}; vendor-audit run ingests new deliveries "
              "again")
    else:
        print(f"dataset {version} restored in {args.home / 'curated'}; vendor-audit run --home {args.home} re-scores it "
              f"(no ingestion while a past version is checked out); vendor-audit checkout --home {args.home} "
              "--dataset-version latest returns to the latest")
    return 0


def _ui(args) -> int:
    """Run ``dg dev`` on the home until this process gets SIGTERM, SIGINT or SIGHUP, which stops dagster's
    whole process group (webserver, daemon, code server); exits 128 + the signal
    (:func:`pipelines.servers.supervise`)."""
    from ml.config import load_settings
    from pipelines.servers import check_port_free, dagster_dev_command, supervise

    require_home(args.home, settings_file=True)  # never create a stray home from a mistyped path
    load_settings(args.home)
    check_port_free(args.host, args.port)
    open_instance(args.home)
    command, env = dagster_dev_command(args.home, args.port, args.host)
    log.info("Dagster UI on http://%s:%d (home %s)", args.host, args.port, args.home)
    return supervise(command, env, "dg dev")


def _automation(args) -> int:
    """Turn the home's sensors and schedule on or off, or list their state, through the ``dagster``
    command line on the home's instance (in parallel: each call loads the code location, seconds)."""
    import subprocess

    from pipelines.definitions import defs
    from pipelines.servers import dagster_cli_command

    require_home(args.home, settings_file=True)
    open_instance(args.home)
    kinds = {**{s.name: "sensor" for s in defs.sensors}, **{s.name: "schedule" for s in defs.schedules}}
    unknown = [name for name in args.names if name not in kinds]
    if unknown:
        raise ValueError(f"unknown sensor or schedule {', '.join(unknown)}: the home has {', '.join(kinds)}")
    if args.action == "status":
        calls = [("sensor", "list"), ("schedule", "list")]
    elif args.names or args.action == "off":  # `dagster ... stop` takes one name at a time
        calls = [(kinds[name], "start" if args.action == "on" else "stop", name) for name in args.names or kinds]
    else:
        calls = [("sensor", "start", "--start-all"), ("schedule", "start", "--start-all")]
    processes = []
    for words in calls:
        command, env = dagster_cli_command(args.home, *words)
        processes.append(subprocess.Popen(command, env=dict(os.environ, **env), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    failed = []
    for words, process in zip(calls, processes):
        out, err = process.communicate()
        if process.returncode:
            failed.append(f"dagster {' '.join(words)}: {(err.strip().splitlines() or ['exit status ' + str(process.returncode)])[-1]}")
        # dagster's answer without its code server's log lines and its underlines of asterisks
        print("\n".join(line for line in out.splitlines()
                        if line.strip() and not set(line) <= {"*"} and "dagster.code_server" not in line))
    if failed:
        raise RuntimeError("; ".join(failed))
    if args.action == "on":
        print(f"they run while the Dagster daemon runs: vendor-audit ui --home {args.home} starts it (with the UI)")
    return 0


def _mlflow_ui(args) -> int:
    """Run ``mlflow server`` on the home's tracking store, as :func:`_ui` runs ``dg dev``."""
    from pipelines.servers import MODEL_TRAINING_VIEW, check_port_free, mlflow_server_command, supervise

    check_port_free(args.host, args.port)
    command, env = mlflow_server_command(args.home, args.port, args.host)
    log.info("MLflow UI on http://%s:%d/#/experiments?%s (home %s)", args.host, args.port, MODEL_TRAINING_VIEW,
             args.home)
    return supervise(command, env, "mlflow server")


def _without_paths(argv: list[str]) -> list[str]:
    """Command-line words without ``--home DIR`` and ``--output FILE`` (machine-specific paths), for
    reproduce lines."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in ("--home", "--output"):
            skip = True
        elif not word.startswith(("--home=", "--output=")):
            kept.append(word)
    return kept


def _bench_command(name: str) -> str:
    """The benchmark command as run, without machine-specific paths, for the heading of its section."""
    import shlex

    return (f"vendor-audit {name} " + " ".join(shlex.quote(a) for a in _without_paths(sys.argv[2:]))).strip()


def _write_bench_section(output: Path, name: str, text: str) -> None:
    from ml.report import write_section

    write_section(output, name, text)
    log.info("wrote %s", output)


def _bench(args) -> None:
    import time

    from ml.bench import BenchConfig, format_late_table, format_tables, run_benchmark

    _console_logging("ml")
    config = BenchConfig(seeds=args.seeds, folds=args.folds, epochs=args.epochs, head=args.head,
                         bootstrap=args.bootstrap, cache=args.home / "bench-cache")
    started = time.perf_counter()
    summaries, late = run_benchmark([k.strip() for k in args.scenarios.split(",")], config)
    tables = (format_tables(summaries) if summaries else "") + "\n".join(format_late_table(s) for s in late)
    print(tables)
    text = (f"## `{_bench_command('bench')}`\n\n"
            f"Model: K={args.folds}-fold {args.head} CNN, {args.epochs} epochs on Fashion-MNIST (20 on digits), CPU; "
            f"{(time.perf_counter() - started) / 60:.0f} min for this run. Each cell: ours \\| cleanlab's defaults "
            f"on the same out-of-fold probabilities.\n\n" + tables)
    _write_bench_section(args.output, "bench", text)


def _bench_checks(args) -> None:
    import time

    from ml.bench import BenchConfig
    from ml.bench_checks import format_checks_table, run_checks_benchmark

    _console_logging("ml")
    config = BenchConfig(seeds=args.seeds, folds=args.folds, epochs=args.epochs, head=args.head,
                         cache=args.home / "bench-cache")
    started = time.perf_counter()
    budgets = tuple(int(b) for b in args.budgets.split(","))
    summaries = run_checks_benchmark([k.strip() for k in args.scenarios.split(",")], config, budgets, args.draws)
    table = format_checks_table(summaries)
    print(table)
    text = (f"## `{_bench_command('bench-checks')}`\n\n"
            f"Model outputs as in `vendor-audit bench` (K={args.folds}-fold {args.head} CNN, {args.epochs} epochs, "
            f"cached); per seed, {args.draws} independent check plans per budget, answered from the truth. "
            f"{(time.perf_counter() - started) / 60:.0f} min for this run.\n\n" + table)
    _write_bench_section(args.output, "bench-checks", text)


def _bench_incremental(args) -> None:
    from pipelines.incremental_bench import format_incremental, run_incremental_benchmark

    heads = args.heads if args.heads == "auto" else tuple(args.heads.split(","))
    overrides = {"folds": args.folds, "epochs": args.epochs, "heads": heads}
    rows = run_incremental_benchmark(args.home, [int(c) for c in args.checkpoints.split(",")], args.per_batch,
                                     args.full_up_to, overrides, run_audit, args.dataset, args.source)
    text = format_incremental(rows, _bench_command("bench-incremental"), f"{args.dataset}, {args.per_batch} images "
                              f"a batch, {args.folds}-fold training, heads {args.heads}, {args.epochs} epochs, CPU")
    print(text)
    _write_bench_section(args.output, "bench-incremental", text)


def _screenshots(args) -> None:
    from pipelines.screenshots import take_screenshots

    for path in take_screenshots(args.home, args.out, args.home / "logs"):
        log.info("wrote %s", path)


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default: ``off`` for a flag, the value otherwise, unless the
    help already says it (a default that depends on something else, or none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or isinstance(action, (argparse._HelpAction,
                                                                                 argparse._VersionAction)):
            return text
        if action.nargs == 0:  # a flag: store_true, or --debug whose default is SUPPRESS after the command
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def package_version() -> str:
    """The installed package's version (its metadata), or ``unknown`` when run from an uninstalled tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vendor-audit")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vendor-audit", description="Judge image-annotation vendors from their data.",
                                     formatter_class=_HelpWithDefaults,
                                     epilog="exit status: 0 all well; 1 infrastructure failure (tracking store, DVC, "
                                            "model files, a UI server that stopped on its own); 2 usage, settings "
                                            "or input error that stopped the run (a UI port in use); 3 the audit "
                                            "finished but some input had problems; 4 the audit finished and some "
                                            "vendor is in breach of its contract (run; 3 comes first; not with "
                                            "--no-breach-status); 128+N a UI stopped by signal N")
    debug_help = "show tracebacks and DEBUG logs"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="show the version and exit")
    # also accepted after the command; SUPPRESS keeps a --debug given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common],
                           formatter_class=_HelpWithDefaults)
        p.add_argument("--home", type=lambda s: Path(s).expanduser().resolve(), default=default_home(),
                       help="data home: landing/, curated data, DVC, MLflow, Dagster, reports/ "
                            "(default: $VENDOR_AUDIT_HOME or ./home)")
        return p

    for name, help_text in (("simulate", "write simulated vendor deliveries with known wrong labels"),
                            ("demo", "simulate the reference case and run the audit")):
        p = add(name, help_text)
        p.add_argument("--dataset", choices=["fashion-mnist", "digits", "cifar10"], default="fashion-mnist",
                       help="source of the images and their true labels (cifar10: photos)")
        p.add_argument("--source", type=Path, default=None, metavar="PATH",
                       help="cifar10 only: an .npz with images uint8 (N, 32, 32, 3) and labels (default: $CIFAR10_NPZ, "
                            "else torchvision's downloader where there is internet)")
        p.add_argument("--vendors", default=DEFAULT_VENDORS,
                       help="vendors and the share of their labels made wrong: name=error_rate,...")
        p.add_argument("--per-vendor", type=int, default=2000, metavar="N", help="images delivered by each vendor")
        p.add_argument("--seed", type=int, default=0, help="random seed of the draw of images and wrong labels")
        p.add_argument("--batch", default="batch-001", help="batch name of the deliveries (landing/<vendor>/<batch>)")
        p.add_argument("--noise", choices=["uniform", "pairs"], default="uniform",
                       help="wrong labels: any other class, or swaps of confusable class pairs")
        p.add_argument("--ambiguous", type=float, default=0.0,
                       help="share of images composed of two classes (their truth is both)")
        if name == "demo":
            p.add_argument("--wide", action="store_true", help="print every scorecard column, not only the main ones")
            p.add_argument("--checks", type=int, default=None, metavar="N",
                           help="then plan N hand checks per vendor, answer them from the simulated truth "
                                "(checks/demo.csv) and run again (default: none, no hand checks)")
    p = add("init", "create a home for your own deliveries: a commented settings file with your classes, and "
                    "landing/")
    p.add_argument("--classes", required=True, metavar="NAME,NAME,...",
                   help="the class names in order, comma-separated (no default: required)")
    p = add("run", "ingest new deliveries and audit the vendors")
    p.add_argument("--wide", action="store_true", help="print every scorecard column, not only the main ones")
    p.add_argument("--retrain", action="store_true", help="retrain and re-score even if no delivery is new")
    p.add_argument("--rescore", action="store_true",
                   help="re-estimate label issues and the scorecard with the champion model even if nothing is new "
                        "(after upgrading vendor-audit, say); no retraining")
    p.add_argument("--ingest-only", action="store_true",
                   help="only ingest new deliveries and version the data with DVC, no scoring (the ingest stage "
                        "of the home's dvc.yaml)")
    p.add_argument("--no-breach-status", action="store_true",
                   help="a vendor in breach of its contract does not make the exit status 4 (the home's dvc.yaml "
                        "audit stage: a breach lasts, and would fail every dvc repro)")
    p = add("plan", "draw the next hand-check plan: reports/check_plan.csv and check_plan.md list the images to check")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--budget", type=float, metavar="N",
                      help="expected checks per vendor in this plan (no default: --budget or --halfwidth is required)")
    size.add_argument("--halfwidth", type=float, metavar="H",
                      help="per vendor, the checks expected to give a 95%% interval of +-H, e.g. 0.02 "
                           "(no default: --budget or --halfwidth is required)")
    add("datasets", "list the dataset versions recorded in the home's git: deliveries, images, models, scorecards")
    p = add("checkout", "restore a past dataset version in curated/ (git restore of curated.dvc, then dvc checkout)")
    p.add_argument("--dataset-version", required=True, metavar="VERSION",
                   help="a version listed by vendor-audit datasets (a unique prefix is enough), or latest "
                        "(no default: required)")
    p = add("bench", "benchmark the estimates against the truth and cleanlab; writes BENCHMARKS.md")
    p.add_argument("--scenarios", default="A,B,C,D,E,W,N,S500,S100,L",
                   help="comma-separated scenario keys (see BENCHMARKS.md)")
    p.add_argument("--seeds", type=int, default=10, help="seeds per scenario")
    p.add_argument("--folds", type=int, default=3, help="cross-validation folds of each training")
    p.add_argument("--epochs", type=int, default=8, help="training epochs per fold (20 on digits)")
    p.add_argument("--head", choices=["softmax", "l2softmax"], default="l2softmax", help="classifier head")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap refits behind each interval")
    p.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"),
                   help="Markdown file whose bench section is replaced (created if missing)")
    p = add("bench-checks", "benchmark hand checks: the combined estimate per budget against uniform checks alone")
    p.add_argument("--scenarios", default="A,B,C,D,W", help="comma-separated scenario keys of vendor-audit bench")
    p.add_argument("--budgets", default="25,50,100,200", help="checks per vendor, comma-separated")
    p.add_argument("--seeds", type=int, default=10, help="seeds per scenario")
    p.add_argument("--draws", type=int, default=20, help="check plans drawn per seed and budget")
    p.add_argument("--folds", type=int, default=3, help="as in vendor-audit bench")
    p.add_argument("--epochs", type=int, default=8, help="as in vendor-audit bench")
    p.add_argument("--head", choices=["softmax", "l2softmax"], default="l2softmax", help="as in vendor-audit bench")
    p.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"),
                   help="Markdown file whose bench-checks section is replaced (created if missing)")
    p = add("bench-incremental", "time new-batch scoring against full re-runs as batches accumulate")
    p.add_argument("--checkpoints", default="1,5,20",
                   help="numbers of deliveries already in when a new one is timed, comma-separated")
    p.add_argument("--per-batch", type=int, default=2000, metavar="N", help="images in each simulated delivery")
    p.add_argument("--full-up-to", type=int, default=20, metavar="N",
                   help="largest checkpoint that also times a full re-run")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds of each training")
    p.add_argument("--epochs", type=int, default=8, help="training epochs per fold")
    p.add_argument("--heads", default="auto",
                   help="classifier heads trained, comma-separated, or auto (the settings' rule)")
    p.add_argument("--dataset", choices=["fashion-mnist", "cifar10"], default="fashion-mnist",
                   help="images of the deliveries: Fashion-MNIST (vendors a, b, c) or CIFAR-10 photos (a, b, c, d)")
    p.add_argument("--source", type=Path, default=None, metavar="PATH",
                   help="cifar10 only: an .npz of photos, as for simulate (default: $CIFAR10_NPZ)")
    p.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"),
                   help="Markdown file whose bench-incremental section is replaced (created if missing)")
    p = add("automation", "turn the home's sensors and nightly schedule on or off, or list their state (they run "
                          "while the Dagster daemon runs: vendor-audit ui starts it)")
    p.add_argument("action", nargs="?", choices=["on", "off", "status"], default="status",
                   help="on, off, or status: each one's state")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="only these sensors or schedules (default: all of them: delivery_sensor, "
                        "scorecard_refresh_sensor, checks_sensor, scorecard_automation, nightly_audit)")
    p = add("screenshots", "screenshot the Dagster lineage and the MLflow run comparison (headless Chromium)")
    p.add_argument("--out", type=Path, default=Path("docs/img"), help="folder the PNG files are written to")
    for name, help_text, port in (("ui", "start the Dagster UI (dg dev: webserver and daemon) on this home", 3000),
                                  ("mlflow-ui", "start the MLflow UI on this home's tracking store", 5000)):
        p = add(name, help_text)
        p.add_argument("--host", default="127.0.0.1", help="address the server listens on")
        p.add_argument("--port", type=int, default=port, help="port the server listens on")
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each line (tests and tools replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _console_logging(*names: str, level: int = logging.INFO) -> None:
    """Log these loggers' lines from ``level`` on to stderr, once per process, and not again through
    the root logger (which some libraries configure). ml's own lines reach the console through
    Dagster's managed loggers during runs."""
    for name in names:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if any(getattr(h, "vendor_audit", False) for h in logger.handlers):
            continue
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.vendor_audit = True
        logger.addHandler(handler)
        logger.propagate = False


def _error(args, message: str, status: int) -> int:
    """Print one error line (the traceback before it with --debug) and return the exit status."""
    if getattr(args, "debug", False):
        traceback.print_exc()
    elif status == 1:
        message += " (--debug shows the traceback)"
    print(f"vendor-audit: error: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 all well; 1 infrastructure failure; 2 usage, settings or input error that stopped
    the run; 3 the audit finished but some input had problems (a delivery rejected whole, a failed check);
    4 the audit finished and some vendor is in breach of its contract (``run``, ``demo``; 3 comes first;
    not with ``run --no-breach-status``); 128 + N a UI server stopped by signal N."""
    _console_logging("vendor_audit", "pipelines")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = build_parser().parse_args(argv)
    if args.debug:
        _console_logging("vendor_audit", "pipelines", "ml", level=logging.DEBUG)
    import dagster as dg

    from ml.check_plan import CheckPlanError
    from ml.config import ConfigError
    from ml.delivery import DeliveryError, TaxonomyChanged
    from pipelines.resources import DvcError, TrackingUnavailable
    from pipelines.servers import ServerExited
    from pipelines.store import ModelFileError

    input_errors = (ConfigError, DeliveryError, TaxonomyChanged, CheckPlanError)
    commands = {"init": _init, "simulate": _simulate, "demo": _demo, "run": _run, "plan": _plan, "datasets": _datasets,
                "checkout": _checkout, "automation": _automation, "bench": _bench,
                "bench-incremental": _bench_incremental, "bench-checks": _bench_checks, "screenshots": _screenshots, "ui": _ui,
                "mlflow-ui": _mlflow_ui}
    try:
        if args.command in NEEDS_HOME:
            require_home(args.home)
        status = commands[args.command](args)
    except (*input_errors, ValueError, FileNotFoundError) as exc:
        return _error(args, str(exc), 2)
    except (TrackingUnavailable, DvcError, ModelFileError, ServerExited) as exc:
        return _error(args, str(exc), 1)
    except dg.Failure as exc:
        return _error(args, exc.description, 1)
    except dg.DagsterExecutionStepExecutionError as exc:
        cause = exc.__cause__ or exc
        return _error(args, f"in {exc.step_key}: {cause}", 2 if isinstance(cause, input_errors) else 1)
    except Exception as exc:  # noqa: BLE001 - anything else: one line, the traceback with --debug
        return _error(args, f"{exc.__class__.__name__}: {exc}", 1)
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
