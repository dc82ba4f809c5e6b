"""Label issues per image and the vendor scorecard with its report."""

import json

import dagster as dg
import numpy as np
import pandas as pd

from assets.training import cv_models
from ml.audit import run_audit
from ml.delivery import atomic_write_bytes, atomic_write_csv, load_curated_rows
from ml.report import confusion_plot, markdown_table, render_report, write_text_atomic
from ml.scorecard import build_scorecard, compare_vendors
from ml.estimate import VendorRates
from pipelines.resources import AuditHome, DvcRepo, MlflowTracking
from pipelines.store import load_outputs, load_selection


def _table(frame: pd.DataFrame) -> dg.MetadataValue:
    types = {"i": "int", "f": "float", "b": "bool"}
    schema = dg.TableSchema(columns=[dg.TableColumn(c, types.get(frame[c].dtype.kind, "string")) for c in frame.columns])
    records = [dg.TableRecord({k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()})
               for row in frame.to_dict(orient="records")]
    return dg.MetadataValue.table(records, schema=schema)


@dg.asset(
    deps=[cv_models],
    group_name="scoring",
    kinds={"pandas", "csv"},
    description="Per image: probability the given label is wrong, suggested label and a verdict "
                "(ok, error, ambiguous, outlier) from per-vendor noise models fitted to the out-of-fold "
                "probabilities; reports/label_issues.csv.",
)
def label_issues(context: dg.AssetExecutionContext, audit_home: AuditHome, dvc: DvcRepo) -> dg.MaterializeResult:
    settings = audit_home.settings()
    dataset_version = dvc.version_of("curated")
    selection = load_selection(audit_home.models, dataset_version)
    outputs = load_outputs(audit_home.models, dataset_version, selection["selected"]["head"])
    rows = load_curated_rows(audit_home.curated)
    if not np.array_equal(outputs.image_ids, rows["image_id"].to_numpy().astype(str)):
        raise dg.Failure(f"model outputs for dataset {dataset_version} do not match the curated rows; retrain")
    result, issues = run_audit(rows, outputs.probs, outputs.embeddings, settings.classes,
                               n_boot=settings.bootstrap, seed=settings.seed)
    atomic_write_csv(audit_home.reports / "label_issues.csv", issues)
    atomic_write_bytes(audit_home.models / dataset_version / "audit.npz", result.to_npz())
    counts = issues["verdict"].value_counts().to_dict()
    context.log.info(f"label issues: {counts}")
    worst = issues.sort_values("p_error", ascending=False).head(20)
    return dg.MaterializeResult(metadata={
        "dataset_version": dataset_version,
        "model_version": selection["selected"]["model_version"],
        "verdicts": dg.MetadataValue.json({k: int(v) for k, v in counts.items()}),
        "noise_model_temperature": float(result.model.temperature),
        "most_likely_errors": _table(worst),
        "path": dg.MetadataValue.path(str(audit_home.reports / "label_issues.csv")),
    })


@dg.asset(
    deps=[label_issues],
    group_name="scoring",
    kinds={"pandas", "mlflow"},
    pool="dvc",
    description="One row per vendor: error rate with a 95% interval, flagged and ambiguous counts, rank; "
                "pairwise comparisons and a Markdown report with confusion plots under reports/.",
)
def vendor_scorecard(context: dg.AssetExecutionContext, audit_home: AuditHome, dvc: DvcRepo,
                     mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    settings = audit_home.settings()
    dataset_version = dvc.version_of("curated")
    selection = load_selection(audit_home.models, dataset_version)
    with np.load(audit_home.models / dataset_version / "audit.npz", allow_pickle=False) as saved:
        vendors = [str(v) for v in saved["vendors"]]
        rates = VendorRates(saved["rate"], saved["low"], saved["high"], saved["bootstrap"])
        confusion = saved["confusion"]
    issues = pd.read_csv(audit_home.reports / "label_issues.csv", dtype={"image_id": str}, keep_default_na=False)
    vendor_index = issues["vendor"].map({v: i for i, v in enumerate(vendors)}).to_numpy(np.int64)
    scorecard = build_scorecard(vendors, vendor_index, issues["verdict"].to_numpy(), rates)
    comparisons = compare_vendors(vendors, rates)
    reports = audit_home.reports
    atomic_write_csv(reports / "scorecard.csv", scorecard)
    atomic_write_csv(reports / "comparisons.csv", comparisons)
    plots = {}
    for v, name in enumerate(vendors):
        atomic_write_bytes(reports / "plots" / f"confusion-{name}.png",
                           confusion_plot(confusion[v], settings.classes, f"{name}: estimated confusion"))
        plots[name] = f"plots/confusion-{name}.png"
    selected = selection["selected"]
    provenance = {"dataset_version": dataset_version, "model": f"{mlflow_tracking.registered_model} v{selected['model_version']}",
                  "head": selected["head"], "mlflow_run": selected["run_id"]}
    top = issues[issues["verdict"] == "error"].sort_values("p_error", ascending=False).head(15)
    report = render_report(scorecard, comparisons, provenance, plots, top)
    write_text_atomic(reports / "report.md", report)
    atomic_write_bytes(reports / "provenance.json", json.dumps(provenance, indent=2).encode())
    dvc.commit_stage("audit")
    mlflow = mlflow_tracking.start()
    with mlflow.start_run(run_id=selected["run_id"]):
        mlflow.log_artifacts(str(reports), artifact_path="audit-report")
    context.log.info("scorecard:\n" + scorecard.to_string(index=False))
    return dg.MaterializeResult(metadata={
        "scorecard": _table(scorecard),
        "comparisons": _table(comparisons),
        "report": dg.MetadataValue.md(report),
        **provenance,
    })
