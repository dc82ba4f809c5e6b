"""One audit of a home: ingest new deliveries, score them, refresh the scorecard, each step a Dagster
job run in this process on the home's instance."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import pandas as pd

from pipelines.console import StderrHandler
from pipelines.home import open_instance

if TYPE_CHECKING:
    from ml.delivery import RunSummary

log = logging.getLogger("vendor_audit")


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
    from ml.ray_features import held_ray

    load_settings(home)  # a missing or invalid settings file stops here, before anything runs
    with audit_lock(home), held_ray():  # engine ray: one Ray for all of this run's jobs
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
    elif _worsening_window_changed(audit_home, settings):
        log.info("worsening_window_days changed in %s: re-scoring (no retraining)", home / CONFIG_NAME)
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


def _last_provenance(audit_home) -> dict:
    """The last audit's provenance.json ({} before the first audit)."""
    import json

    path = audit_home.reports / "provenance.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _worsening_window_changed(audit_home, settings) -> bool:
    """Whether ``worsening_window_days`` differs from the one the last audit's worsening test used
    (recorded in provenance.json where set)."""
    return _last_provenance(audit_home).get("worsening_window_days") != settings.worsening_window_days


def _scored_another_version(audit_home, dvc) -> bool:
    """Whether the reports were written for another dataset version than the one in curated/ (after
    ``vendor-audit checkout`` back to the latest, say)."""
    provenance = _last_provenance(audit_home)
    if not provenance or not (audit_home.root / "curated.dvc").is_file():
        return False
    return provenance.get("dataset_version") != dvc.version_of("curated")


def _execute(defs, job_name: str, instance, debug: bool, run_config: dict | None = None, **kwargs) -> None:
    """Run a job of the Definitions in this process. Its console log shows a failure as one line (the
    error), not the Dagster traceback, unless ``debug``; the instance's event log keeps everything."""
    import dagster as dg

    def console(_init_context) -> logging.Logger:
        logger = logging.Logger("dagster", logging.DEBUG if debug else logging.INFO)
        handler = StderrHandler()
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
