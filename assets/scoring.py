"""New deliveries scored by the champion, label issues per image, and the vendor scorecard."""

import warnings

import dagster as dg
import numpy as np
import pandas as pd

from assets.checks import hand_checks
from assets.ingestion import vendor_delivery
from assets.partitions import deliveries
from assets.training import cv_models
from ml.audit import run_audit
from ml.check_plan import apply_checks, read_answers, read_plans, vendor_checks
from ml.delivery import (
    Delivery, arrival_order, duplicate_of, is_rejected, load_curated_delivery, load_curated_rows, parse_key,
)
from ml.contract import vendor_limits
from ml.deliveries import delivery_check, delivery_table, with_delivery_contract, worsening, worsening_note
from ml.files import atomic_write_bytes, atomic_write_csv
from ml.reliability import assess_reliability
from pipelines.resources import AuditHome, DvcRepo, MlflowTracking
from pipelines.store import (
    batch_scores_path, champion_outputs, load_ensemble, load_image_ids, load_outputs, save_batch_scores, score_new_delivery,
)


def _table(frame: pd.DataFrame) -> dg.MetadataValue:
    types = {"i": "int", "f": "float", "b": "bool"}
    schema = dg.TableSchema(columns=[dg.TableColumn(c, types.get(frame[c].dtype.kind, "string")) for c in frame.columns])
    records = [dg.TableRecord({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
               for row in frame.to_dict(orient="records")]
    return dg.MetadataValue.table(records, schema=schema)


def _require_champion(mlflow_tracking: MlflowTracking) -> dict:
    champion = mlflow_tracking.champion()
    if champion is None:
        raise dg.Failure("no registered champion model yet: train first (vendor-audit run --retrain, or the "
                         "audit_vendors job)")
    return champion


@dg.asset(
    partitions_def=deliveries,
    deps=[vendor_delivery],
    group_name="vendor_audit",
    kinds={"pytorch"},
    description="One delivery scored by the registered champion model (out-of-sample: it never saw the "
                "delivery). Nothing to do before the first training or when the champion was trained on it.",
)
def batch_scores(context: dg.AssetExecutionContext, audit_home: AuditHome,
                 mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    vendor, batch = parse_key(context.partition_key)
    if is_rejected(Delivery(vendor, batch, audit_home.landing / vendor / batch), audit_home.delivery_state):
        return dg.MaterializeResult(metadata={"scored_by": "nothing: the delivery was rejected whole"})
    champion = mlflow_tracking.champion()
    if champion is None:
        return dg.MaterializeResult(metadata={"scored_by": "none yet: the first training covers this delivery"})
    rows, images = load_curated_delivery(audit_home.curated, vendor, batch)
    if rows["image_id"].isin(load_image_ids(audit_home.models, champion["dataset_version"], champion["head"])).all():
        return dg.MaterializeResult(metadata={"scored_by": f"v{champion['model_version']} out-of-fold"})
    trained = load_outputs(audit_home.models, champion["dataset_version"], champion["head"])
    # a probe ensemble reads the same backbone's features from the training's cache
    settings = audit_home.settings()
    ensemble = load_ensemble(audit_home.models, champion["dataset_version"], champion["head"], settings.classes,
                             feature_cache=audit_home.features, engine=settings.compute_engine())
    outputs = score_new_delivery(ensemble, rows, images, trained, load_curated_rows(audit_home.curated))
    path = batch_scores_path(audit_home.root, champion["model_version"], vendor, batch)
    save_batch_scores(path, outputs)
    context.log.info(f"{context.partition_key}: {len(rows)} images scored by model v{champion['model_version']}")
    return dg.MaterializeResult(metadata={"scored_by": f"v{champion['model_version']}", "n_images": len(rows),
                                          "trained_on": champion["dataset_version"]})


def _delivery_rates(context: dg.AssetExecutionContext, audit_home: AuditHome, result, issues: pd.DataFrame,
                    arrivals: pd.DataFrame, settings) -> pd.DataFrame:
    """Each delivery's rate (reports/deliveries.csv), combined with the hand checks that fall in it, and
    as an observation of its ``vendor_delivery`` partition, so that the UI shows each partition's rate;
    whether each vendor's newest delivery is worse than its earlier ones (reports/worsening.csv)."""
    groups = result.deliveries
    by_delivery = issues.assign(vendor=issues["vendor"].astype(str) + "/" + issues["batch"].astype(str))
    plans = read_plans(audit_home.plans)
    checks = vendor_checks(by_delivery, plans, groups.names, groups.rates.low, groups.rates.high)
    delivered_at = {f"{a.vendor}/{a.batch}": a.ingested_at for a in arrivals.itertuples(index=False)}
    table = delivery_table(groups, issues["verdict"].to_numpy(), dict(zip(result.vendors, result.rates.upper_only)),
                           result.heldout_accuracy, len(settings.classes), delivered_at, checks)
    limits = vendor_limits(result.vendors, settings.contract_max_error_rate, settings.contract_overrides)
    table = with_delivery_contract(table, limits, by_delivery, plans)
    got_worse = worsening(groups, delivered_at, window_days=settings.worsening_window_days)
    atomic_write_csv(audit_home.reports / "worsening.csv", got_worse)
    known = set(context.instance.get_dynamic_partitions(deliveries.name))
    for _, row in table.iterrows():
        key = Delivery(row["vendor"], row["delivery"], audit_home.landing / row["vendor"] / row["delivery"]).key
        if key not in known:
            continue
        metadata = {"error_rate": float(row["error_rate"]), "error_rate_low": float(row["error_rate_low"]),
                    "error_rate_high": float(row["error_rate_high"]), "n_images": int(row["n_images"]),
                    "basis": str(row["basis"]), "status": str(row["status"]),
                    "contract_verdict": str(row["contract_verdict"]), "contract_action": str(row["contract_action"])}
        context.log_event(dg.AssetObservation(asset_key=vendor_delivery.key, partition=key, metadata=metadata))
        # the partition's check as this audit sees it: the UI and Dagster's alerting show it per delivery
        context.log_event(_delivery_evaluation(row, _worse_text(got_worse, row), key, metadata))
    return table


def _worse_text(got_worse: pd.DataFrame, row) -> str:
    """The worsening note where ``row`` is one of the newest deliveries of a vendor found worse, else ""."""
    newest = got_worse["newest"].astype(str).str.split("|")
    hit = got_worse[(got_worse["vendor"].astype(str) == str(row["vendor"])) & got_worse["worse"].astype(bool)
                    & newest.map(lambda recent: str(row["delivery"]) in recent)]
    return worsening_note(next(hit.itertuples(index=False))) if len(hit) else ""


def _delivery_evaluation(row, worse: str, key: str, metadata: dict) -> dg.AssetCheckEvaluation:
    passed, severity, description = delivery_check(row, worse)
    return dg.AssetCheckEvaluation(
        asset_key=vendor_delivery.key, check_name="delivery_within_contract", passed=passed, partition=key,
        severity=_severity(severity), description=description, metadata=metadata)


def _severity(name: str) -> dg.AssetCheckSeverity:
    """:func:`ml.deliveries.delivery_check`'s severity ("" where the check passed: WARN, Dagster's mildest)."""
    return dg.AssetCheckSeverity[name or "WARN"]


def _delivery_check_definition(check_fn):
    # a partitioned asset check is a preview in the pinned dagster 1.13: its warning says so at every import
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.asset_check(
            asset=vendor_delivery, partitions_def=deliveries, required_resource_keys={"audit_home"},
            description="The delivery within its vendor's contract and no worse than the vendor's earlier "
                        "deliveries, as the last audit rated it (reports/deliveries.csv): WARN while undecided or "
                        "worse, ERROR on a breach. Every audit records it for each delivery; run with the "
                        "delivery's ingestion it reads the last audit's figures (a new delivery: not rated yet).")(check_fn)


@_delivery_check_definition
def delivery_within_contract(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    audit_home: AuditHome = context.resources.audit_home
    vendor, batch = parse_key(context.partition_key)
    path = audit_home.reports / "deliveries.csv"
    table = pd.read_csv(path, dtype={"vendor": str, "delivery": str}, keep_default_na=False) if path.is_file() \
        else pd.DataFrame(columns=["vendor", "delivery"])
    rows = table[(table["vendor"] == vendor) & (table["delivery"] == batch)]
    if rows.empty or "contract_verdict" not in rows:  # run with its ingestion: the audit after it rates it
        return dg.AssetCheckResult(passed=True, description="not rated yet: the audit after its ingestion rates it "
                                                            "and records this check again")
    worse_path = audit_home.reports / "worsening.csv"
    got_worse = pd.read_csv(worse_path, dtype={"vendor": str, "newest": str}) if worse_path.is_file() \
        else pd.DataFrame(columns=["vendor", "newest", "worse"])
    passed, severity, description = delivery_check(rows.iloc[0], _worse_text(got_worse, rows.iloc[0]))
    return dg.AssetCheckResult(passed=passed, severity=_severity(severity), description=description)


@dg.asset(
    deps=[cv_models, batch_scores, hand_checks],
    group_name="vendor_audit",
    kinds={"pandas", "csv"},
    description="Per image: probability the given label is wrong, suggested label and a verdict "
                "(ok, error, ambiguous, outlier) from per-vendor noise models fitted to the champion's "
                "out-of-sample probabilities; a checked image's verdict follows its hand check (checked_labels; "
                "the model's verdict kept in model_verdict); reports/label_issues.csv.",
)
def label_issues(context: dg.AssetExecutionContext, audit_home: AuditHome, dvc: DvcRepo,
                 mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    settings = audit_home.settings()
    champion = _require_champion(mlflow_tracking)
    rows = load_curated_rows(audit_home.curated)
    outputs, source, unscored = champion_outputs(audit_home.root, champion, rows)
    if unscored:
        raise dg.Failure(f"deliveries not scored by the champion v{champion['model_version']} yet: "
                         f"{', '.join(unscored)} (materialize batch_scores for them)")
    result, issues = run_audit(rows, outputs.probs, outputs.embeddings, settings.classes,
                               n_boot=settings.bootstrap, seed=settings.seed, trained=source == "out-of-fold")
    reliability = assess_reliability(result.rates, result.heldout_accuracy, len(settings.classes))
    for v in np.flatnonzero(reliability.unreliable):
        context.log.warning(f"vendor {result.vendors[v]}: its rate is unreliable: {reliability.why(v)}")
    delivered = rows[["vendor", "batch"]].drop_duplicates().itertuples(index=False)
    arrivals = arrival_order([Delivery(v, b, audit_home.landing / v / b) for v, b in delivered],
                             audit_home.curated, audit_home.delivery_state)
    issues = issues.assign(model_version=champion["model_version"], model_trained_on=champion["dataset_version"],
                           prediction=source, duplicate_of=duplicate_of(rows, arrivals).to_numpy())
    issues = apply_checks(issues, read_answers(audit_home.reports / "hand_checks.csv"))
    atomic_write_csv(audit_home.reports / "label_issues.csv", issues)
    atomic_write_bytes(audit_home.reports / "audit.npz", result.to_npz())
    per_delivery = _delivery_rates(context, audit_home, result, issues, arrivals, settings)
    atomic_write_csv(audit_home.reports / "deliveries.csv", per_delivery)
    annotators_path = audit_home.reports / "annotators.csv"
    if result.annotators is not None:
        atomic_write_csv(annotators_path, result.annotators)
    else:
        annotators_path.unlink(missing_ok=True)  # no annotator named: no stale table from an earlier audit
    counts = issues["verdict"].value_counts().to_dict()
    context.log.info(f"label issues: {counts}; {int((issues['checked_labels'] != '').sum())} images checked by hand")
    worst = issues.sort_values("p_error", ascending=False).head(20)
    return dg.MaterializeResult(metadata={
        "dataset_version": dvc.version_of("curated"),
        "model_version": champion["model_version"],
        "model_trained_on": champion["dataset_version"],
        "verdicts": dg.MetadataValue.json({k: int(v) for k, v in counts.items()}),
        "noise_model_temperature": float(result.model.temperature),
        # how much of a known wrong label each vendor's estimate counts (the sensitivity correction)
        "detection_sensitivity": dg.MetadataValue.json(
            {v: round(float(x), 4) for v, x in zip(result.vendors, result.rates.sensitivity)}),
        "most_likely_errors": _table(worst),
        "path": dg.MetadataValue.path(str(audit_home.reports / "label_issues.csv")),
    })
