"""Ingestion of one vendor delivery into the curated dataset and quarantine."""

import dagster as dg

from assets.partitions import deliveries
from ml.delivery import (
    READY_MARKER, has_changed, is_ingested, Delivery, infer_format, ingest_delivery, parse_key, read_format, write_curated, write_format,
)
from pipelines.resources import AuditHome


@dg.asset(
    partitions_def=deliveries,
    group_name="vendor_audit",
    kinds={"python", "csv"},
    description="One vendor delivery validated row by row: accepted rows and decoded images go to "
                "curated/<vendor>/<batch>, rejected rows to quarantine/<vendor>/<batch>.csv with a reason.",
    check_specs=[
        dg.AssetCheckSpec("rows_reconcile", asset="vendor_delivery",
                          description="accepted + quarantined = delivered"),
        dg.AssetCheckSpec("quarantine_share", asset="vendor_delivery",
                          description="share of quarantined rows under quarantine_warn_share"),
    ],
)
def vendor_delivery(context: dg.AssetExecutionContext, audit_home: AuditHome) -> dg.MaterializeResult:
    vendor, batch = parse_key(context.partition_key)
    settings = audit_home.settings()
    delivery = Delivery(vendor, batch, audit_home.landing / vendor / batch)
    if not (delivery.folder / READY_MARKER).is_file():
        raise dg.Failure(f"{delivery.folder}: no {READY_MARKER} marker: the delivery is not complete")
    if is_ingested(delivery, audit_home.curated):
        if has_changed(delivery, audit_home.curated):
            raise dg.Failure(f"delivery {delivery.key} changed after it was ingested; ingested rows are never "
                             "replaced or mixed: deliver it again under a new batch name")
        context.log.info(f"{delivery.key} is ingested already and unchanged: nothing to do")
        return dg.MaterializeResult(metadata={"unchanged": True}, check_results=[
            dg.AssetCheckResult(check_name="rows_reconcile", passed=True, metadata={"unchanged": True}),
            dg.AssetCheckResult(check_name="quarantine_share", passed=True, severity=dg.AssetCheckSeverity.WARN,
                                metadata={"unchanged": True})])
    image_format = read_format(audit_home.curated)
    if image_format is None:
        inferred = infer_format(delivery)
        image_format = (settings.image_size or inferred[0], settings.channels or inferred[1])
        write_format(audit_home.curated, *image_format)
    result = ingest_delivery(delivery, settings.classes, *image_format)
    write_curated(audit_home.curated, audit_home.quarantine, delivery, result)
    n_delivered, n_quarantined = result.n_delivered, len(result.quarantine)
    context.log.info(f"{delivery.key}: {len(result.accepted)} images accepted, {n_quarantined} rows quarantined")
    share = n_quarantined / n_delivered if n_delivered else 0.0
    reasons = result.quarantine["reason"].value_counts().to_dict()
    return dg.MaterializeResult(
        metadata={
            "n_delivered": n_delivered,
            "n_accepted": len(result.accepted),
            "n_quarantined": n_quarantined,
            "quarantine_reasons": dg.MetadataValue.json(reasons),
            "image_format": f"{image_format[0]}x{image_format[0]}x{image_format[1]}",
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="rows_reconcile",
                passed=result.reconciles,
                metadata={"delivered": n_delivered, "accepted": len(result.accepted), "quarantined": n_quarantined},
            ),
            dg.AssetCheckResult(
                check_name="quarantine_share",
                passed=bool(share <= settings.quarantine_warn_share),
                severity=dg.AssetCheckSeverity.WARN,
                metadata={"share": share, "limit": settings.quarantine_warn_share},
            ),
        ],
    )
