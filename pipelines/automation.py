"""Jobs, the delivery sensor and the nightly schedule."""

import dagster as dg

from assets.ingestion import vendor_delivery
from assets.partitions import deliveries
from ml.delivery import find_ready_deliveries
from pipelines.resources import AuditHome

ingest_job = dg.define_asset_job(
    "ingest_deliveries", selection=dg.AssetSelection.assets(vendor_delivery), partitions_def=deliveries,
    description="Validate one delivery into the curated dataset and quarantine.",
)
audit_job = dg.define_asset_job(
    "audit_vendors", selection=dg.AssetSelection.all() - dg.AssetSelection.assets(vendor_delivery),
    description="Snapshot the dataset with DVC, retrain, detect label issues and score the vendors.",
)


def new_deliveries(instance: dg.DagsterInstance, audit_home: AuditHome) -> list[str]:
    """Keys of complete deliveries in the landing folder that are not partitions yet."""
    known = set(instance.get_dynamic_partitions(deliveries.name))
    return [d.key for d in find_ready_deliveries(audit_home.landing) if d.key not in known]


@dg.sensor(job=ingest_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Adds a partition for every complete (_READY) delivery not yet ingested and requests its run.")
def delivery_sensor(context: dg.SensorEvaluationContext, audit_home: AuditHome) -> dg.SensorResult:
    keys = new_deliveries(context.instance, audit_home)
    if not keys:
        return dg.SensorResult(skip_reason=f"no new complete delivery under {audit_home.landing}")
    context.log.info(f"new deliveries: {', '.join(keys)}")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=key, partition_key=key) for key in keys],
        dynamic_partitions_requests=[deliveries.build_add_request(keys)],
    )


nightly_schedule = dg.ScheduleDefinition(
    name="nightly_audit", job=audit_job, cron_schedule="0 2 * * *", execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Re-snapshot, retrain and re-score every night at 02:00 UTC.",
)
