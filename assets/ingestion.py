"""Ingestion of one vendor delivery into the curated dataset and quarantine."""

from pathlib import Path

import dagster as dg
import pandas as pd

from assets.partitions import deliveries
from ml.config import CONFIG_NAME
from ml.delivery import (
    READY_MARKER, REJECTED, Delivery, DeliveryError, TaxonomyChanged, check_taxonomy, has_changed,
    infer_format, ingest_delivery, is_settled, parse_key, read_format, read_state, read_taxonomy, record_taxonomy,
    reject_delivery, stamp_delivery, write_curated, write_format,
)
from pipelines.resources import AuditHome


@dg.asset(
    partitions_def=deliveries,
    group_name="vendor_audit",
    kinds={"python", "csv"},
    description="One vendor delivery validated row by row: accepted rows and decoded images go to "
                "curated/<vendor>/<batch>, rejected rows to quarantine/<vendor>/<batch>.csv with a reason. "
                "A delivery whose labels.csv cannot be used is quarantined whole (one row with the reason, "
                "nothing curated) and the run goes on.",
    check_specs=[
        # blocking: rows lost between the delivery and the curated data must not be scored or versioned
        dg.AssetCheckSpec("rows_reconcile", asset="vendor_delivery", blocking=True,
                          description="accepted + quarantined = delivered (on a re-run: the rows in the curated and "
                                      "quarantine files against the delivery's record); blocks downstream assets"),
        dg.AssetCheckSpec("quarantine_share", asset="vendor_delivery",
                          description="share of quarantined rows under quarantine_warn_share"),
    ],
)
def vendor_delivery(context: dg.AssetExecutionContext, audit_home: AuditHome) -> dg.MaterializeResult:
    vendor, batch = parse_key(context.partition_key)
    settings = audit_home.settings()
    curated, state = audit_home.curated, audit_home.delivery_state
    delivery = Delivery(vendor, batch, audit_home.landing / vendor / batch)
    if not (delivery.folder / READY_MARKER).is_file():
        raise dg.Failure(f"{delivery.folder}: no {READY_MARKER} marker: the delivery is not complete")
    try:
        check_taxonomy(curated, settings.classes, audit_home.root / CONFIG_NAME)
    except TaxonomyChanged as exc:
        raise dg.Failure(str(exc)) from exc
    if is_settled(delivery, curated, state):
        record = read_state(state, delivery, curated) or {}
        done = "rejected whole" if record.get("status") == REJECTED else "ingested"
        if has_changed(delivery, curated, state):
            never = "ingested rows are never replaced or mixed" if done == "ingested" else "it is not read again"
            raise dg.Failure(f"delivery {delivery.key} changed after it was {done}; {never}: deliver it again "
                             "under a new batch name")
        context.log.info(f"{delivery.key} is {done} already and unchanged: nothing to do")
        return _unchanged(record, settings.quarantine_warn_share, audit_home.quarantine / vendor / f"{batch}.csv",
                          curated / vendor / batch / "rows.csv")
    stamp = stamp_delivery(delivery.folder)  # before reading: a later change is detected
    image_format = read_format(curated)
    try:
        if image_format is None:
            inferred = ((None, None) if settings.image_size and settings.channels
                        else infer_format(delivery, settings.image_limits(settings.image_size)))
            image_format = (settings.image_size or inferred[0], settings.channels or inferred[1])
        # engine ray: the images are decoded by a Ray Data pipeline (a local Ray for the call, or ray_address)
        result = ingest_delivery(delivery, settings.classes, *image_format,
                                 limits=settings.image_limits(image_format[0]), stamp=stamp,
                                 engine=settings.compute_engine())
    except DeliveryError as exc:  # labels.csv unusable: the delivery is quarantined whole, the run goes on
        reject_delivery(curated, audit_home.quarantine, state, delivery, str(exc), stamp)
        context.log.warning(f"{delivery.key} rejected whole: {exc}")
        return _rejected(str(exc), audit_home.quarantine / vendor / f"{batch}.csv", settings.quarantine_warn_share)
    if read_format(curated) is None:
        write_format(curated, *image_format)
    if read_taxonomy(curated) is None:
        record_taxonomy(curated, settings.classes)
    write_curated(curated, audit_home.quarantine, state, delivery, result)
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
            "decoded_by": settings.engine,
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="rows_reconcile",
                passed=result.reconciles,
                metadata={"delivered": n_delivered, "accepted": len(result.accepted), "quarantined": n_quarantined},
            ),
            _share_check(share, settings.quarantine_warn_share),
        ],
    )


def _share_check(share: float, limit: float, **metadata) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(check_name="quarantine_share", passed=bool(share <= limit),
                               severity=dg.AssetCheckSeverity.WARN,
                               metadata={"share": share, "limit": limit, **metadata})


def _rejected(reason: str, quarantine_file, limit: float, **extra) -> dg.MaterializeResult:
    """A delivery whose labels.csv is unusable: nothing curated, the whole delivery quarantined."""
    return dg.MaterializeResult(
        metadata={"rejected_whole": True, "reason": reason, "n_accepted": 0,
                  "quarantine_file": dg.MetadataValue.path(str(quarantine_file)), **extra},
        check_results=[
            # truthful: no row was curated and the delivery as a whole is in quarantine; its rows
            # could not be counted, so there is nothing else to reconcile
            dg.AssetCheckResult(check_name="rows_reconcile", passed=True,
                                description="rejected whole: nothing curated, the whole delivery quarantined",
                                metadata={"rejected_whole": True, "accepted": 0, **extra}),
            _share_check(1.0, limit, rejected_whole=True, **extra),
        ])


def _unchanged(record: dict, limit: float, quarantine_file: Path, rows_file: Path) -> dg.MaterializeResult:
    """A re-run on a delivery read before: no change to read; the checks count again the rows of its
    curated and quarantine files against the number delivered that its record holds."""
    if record.get("status") == REJECTED:
        return _rejected(record.get("reason", ""), quarantine_file, limit, unchanged=True)
    accepted, quarantined = _csv_rows(rows_file), _csv_rows(quarantine_file)
    if "n_delivered" not in record:  # no record of its counts
        return dg.MaterializeResult(metadata={"unchanged": True}, check_results=[
            dg.AssetCheckResult(check_name="rows_reconcile", passed=True, metadata={"unchanged": True}),
            _share_check(0.0, limit, unchanged=True)])
    delivered = int(record["n_delivered"])
    passed = accepted + quarantined == delivered
    return dg.MaterializeResult(metadata={"unchanged": True}, check_results=[
        dg.AssetCheckResult(check_name="rows_reconcile", passed=passed,
                            description=None if passed else
                            f"{delivered} rows delivered, {accepted} in {rows_file}, {quarantined} in {quarantine_file}: "
                            f"{delivered - accepted - quarantined} rows unaccounted for",
                            metadata={"delivered": delivered, "accepted": accepted, "quarantined": quarantined,
                                      "unchanged": True}),
        _share_check(quarantined / delivered if delivered else 0.0, limit, unchanged=True)])


def _csv_rows(path: Path) -> int:
    """Data rows of a CSV file written by the ingestion; 0 when it does not exist."""
    return len(pd.read_csv(path, dtype=str, keep_default_na=False)) if path.is_file() else 0
