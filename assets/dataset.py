"""The curated dataset as one DVC-versioned snapshot."""

import dagster as dg

from assets.ingestion import vendor_delivery
from ml.config import CONFIG_NAME
from ml.delivery import TaxonomyChanged, check_taxonomy, load_curated
from pipelines.locks import DVC_POOL
from pipelines.resources import AuditHome, DvcRepo


@dg.asset(
    deps=[vendor_delivery],
    group_name="vendor_audit",
    kinds={"dvc"},
    pool=DVC_POOL,  # DVC runs one operation at a time per repository
    description="All curated deliveries, tracked by DVC in the home and pushed to its remote; "
                "the version is the DVC hash of curated/, and each new version is a commit of the home's git "
                "(vendor-audit datasets lists them, vendor-audit checkout restores one).",
)
def curated_dataset(context: dg.AssetExecutionContext, audit_home: AuditHome, dvc: DvcRepo) -> dg.MaterializeResult:
    try:  # curated labels in another class list than the models would be read with: stop here
        check_taxonomy(audit_home.curated, audit_home.settings().classes, audit_home.root / CONFIG_NAME)
    except TaxonomyChanged as exc:
        raise dg.Failure(str(exc)) from exc
    rows, images = load_curated(audit_home.curated)
    version, commit = dvc.snapshot_dataset(rows)
    recorded = f"committed as {commit[:8]}" if commit else "recorded already"
    context.log.info(f"dataset version {version}: {len(rows)} images from {rows['vendor'].nunique()} vendors "
                     f"({recorded} in the home's git)")
    per_vendor = rows.groupby("vendor").size()
    return dg.MaterializeResult(
        metadata={
            "dataset_version": version,
            "n_images": len(rows),
            "n_deliveries": int(rows[["vendor", "batch"]].drop_duplicates().shape[0]),
            "images_per_vendor": dg.MetadataValue.json({k: int(v) for k, v in per_vendor.items()}),
            "image_shape": str(tuple(images.shape[1:])),
            "git_commit": commit or dvc.dataset_commit(version) or "",
        },
        data_version=dg.DataVersion(version),
    )
