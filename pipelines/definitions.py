"""The one Definitions object: assets, checks, jobs, sensors, schedule and resources.

The home comes from ``build_definitions(home)`` (the command line) or, for ``dagster dev`` through
``workspace.yaml``, from the ``VENDOR_AUDIT_HOME`` environment variable, read when a run starts.
"""

from __future__ import annotations

import dagster as dg

from assets.checks import hand_checks
from assets.dataset import curated_dataset
from assets.ingestion import vendor_delivery
from assets.scorecard import vendor_scorecard, within_contract
from assets.scoring import batch_scores, delivery_within_contract, label_issues
from assets.training import cv_models
from pipelines.automation import (
    audit_job, checks_sensor, delivery_sensor, ingest_job, nightly_schedule, score_job, scorecard_automation,
    scorecard_refresh_sensor,
)
from pipelines.resources import AuditHome, DvcRepo, MlflowTracking


def build_definitions(home: str | None = None) -> dg.Definitions:
    audit_home = AuditHome(home=home if home is not None else dg.EnvVar("VENDOR_AUDIT_HOME"))
    return dg.Definitions(
        assets=[vendor_delivery, curated_dataset, hand_checks, cv_models, batch_scores, label_issues,
                vendor_scorecard],
        asset_checks=[within_contract, delivery_within_contract],
        jobs=[ingest_job, score_job, audit_job],
        sensors=[delivery_sensor, scorecard_refresh_sensor, checks_sensor, scorecard_automation],
        schedules=[nightly_schedule],
        resources={
            "audit_home": audit_home,
            "mlflow_tracking": MlflowTracking(audit_home=audit_home),
            "dvc": DvcRepo(audit_home=audit_home),
        },
        executor=dg.in_process_executor,  # one training at a time saturates the CPU; DVC needs serial steps
    )


defs = build_definitions()
