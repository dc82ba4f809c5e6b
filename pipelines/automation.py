"""Jobs, the delivery sensor, the scorecard refresh after each ingestion, the hand-checks sensor, and the
nightly schedule."""

import dagster as dg

from assets.ingestion import vendor_delivery
from assets.scorecard import vendor_scorecard
from assets.partitions import deliveries
from assets.scoring import batch_scores
from assets.training import cv_models
from ml.check_plan import answers_fingerprint, read_answers_state
from ml.delivery import changed_deliveries, find_ready_deliveries, is_settled, scan_landing
from pipelines.resources import AuditHome, MlflowTracking

ingest_job = dg.define_asset_job(
    "ingest_deliveries", selection=dg.AssetSelection.assets(vendor_delivery, batch_scores),
    description="Validate one delivery into the curated dataset and score it with the champion model.",
)
_downstream = dg.AssetSelection.all() - dg.AssetSelection.assets(vendor_delivery, batch_scores)
score_job = dg.define_asset_job(
    "score_vendors", selection=_downstream - dg.AssetSelection.assets(cv_models),
    description="Snapshot the dataset and refresh label issues and the scorecard with the champion model.",
)
audit_job = dg.define_asset_job(
    "audit_vendors", selection=_downstream,
    description="Snapshot the dataset, retrain if its version changed, detect label issues, score the vendors.",
)


def new_deliveries(instance: dg.DagsterInstance, audit_home: AuditHome) -> list[str]:
    """Keys of complete deliveries in the landing folder that are not partitions yet."""
    known = set(instance.get_dynamic_partitions(deliveries.name))
    return [d.key for d in find_ready_deliveries(audit_home.landing) if d.key not in known]


def pending_deliveries(audit_home: AuditHome) -> list[str]:
    """Keys of complete deliveries not yet ingested nor rejected whole (new, or interrupted)."""
    return [d.key for d in find_ready_deliveries(audit_home.landing)
            if not is_settled(d, audit_home.curated, audit_home.delivery_state)]


@dg.sensor(job=ingest_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Adds a partition for every complete (_READY) delivery not yet ingested and requests its run.")
def delivery_sensor(context: dg.SensorEvaluationContext, audit_home: AuditHome) -> dg.SensorResult:
    for key in changed_deliveries(audit_home.landing, audit_home.curated, audit_home.delivery_state):
        context.log.warning(f"delivery {key} changed after it was ingested or rejected: ignored; deliver it "
                            "under a new batch name")
    for ignored in scan_landing(audit_home.landing).ignored:
        context.log.warning(f"landing/{ignored.path} ignored: {ignored.reason}")
    keys = new_deliveries(context.instance, audit_home)
    if not keys:
        return dg.SensorResult(skip_reason=f"no new complete delivery under {audit_home.landing}")
    context.log.info(f"new deliveries: {', '.join(keys)}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=key, partition_key=key) for key in keys],
        dynamic_partitions_requests=[deliveries.build_add_request(keys)],
    )


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, monitored_jobs=[ingest_job],
                      request_jobs=[score_job, audit_job], default_status=dg.DefaultSensorStatus.STOPPED,
                      description="After a delivery is ingested: refresh the scorecard with the champion, "
                                  "or train the first model when there is none.")
def scorecard_refresh_sensor(context: dg.RunStatusSensorContext, mlflow_tracking: MlflowTracking):
    job = score_job if mlflow_tracking.champion() is not None else audit_job
    return dg.RunRequest(run_key=f"after-{context.dagster_run.run_id}", job_name=job.name)


def answers_changed(audit_home: AuditHome) -> bool:
    """Whether the files in checks/ or gold/ differ (names, sizes, modification times) from those the
    current scorecard was computed with."""
    scored = read_answers_state(audit_home.checks_state).get("scored", "")
    return answers_fingerprint(audit_home.checks, audit_home.gold) != scored


@dg.sensor(job=score_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.STOPPED,
           description="When files in checks/ or gold/ are added, changed or removed, re-scores the vendors with "
                       "the hand checks (score_vendors: no retraining).")
def checks_sensor(context: dg.SensorEvaluationContext, audit_home: AuditHome,
                  mlflow_tracking: MlflowTracking) -> dg.SensorResult:
    fingerprint = answers_fingerprint(audit_home.checks, audit_home.gold)
    if not answers_changed(audit_home):
        return dg.SensorResult(skip_reason="hand checks unchanged since the last scorecard", cursor=fingerprint)
    if fingerprint == context.cursor:
        return dg.SensorResult(skip_reason="a re-score was already requested for these hand checks")
    if mlflow_tracking.champion() is None:  # the first audit reads the answers; the cursor stays
        return dg.SensorResult(skip_reason="no model yet: the first audit will read the hand checks")
    context.log.info(f"hand checks changed under {audit_home.checks} or {audit_home.gold}: re-scoring")
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=f"checks-{fingerprint[:16] or 'none'}")],
                           cursor=fingerprint)


scorecard_automation = dg.AutomationConditionSensorDefinition(
    "scorecard_automation", target=dg.AssetSelection.assets(vendor_scorecard), minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Evaluates the assets' declarative automation conditions: vendor_scorecard is eager, so it is "
                "materialized whenever label_issues was updated since the scorecard last ran.",
)


nightly_schedule = dg.ScheduleDefinition(
    name="nightly_audit", job=audit_job, cron_schedule="0 2 * * *", execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Every night at 02:00 UTC: retrain when the dataset version changed, then re-score.",
)
