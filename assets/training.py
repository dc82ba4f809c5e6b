"""K-fold training of each classifier head, logged to MLflow, with out-of-fold outputs saved."""

import json
from dataclasses import asdict
from pathlib import Path

import dagster as dg
import numpy as np
import torch

from assets.dataset import curated_dataset
from ml.delivery import atomic_write_bytes, load_curated
from ml.train import CrossValResult, FoldEnsemble, TrainConfig, cross_validate, pick_device
from pipelines.resources import AuditHome, DvcRepo, MlflowTracking
from pipelines.store import ModelOutputs, save_outputs


def _train_config(settings, head: str) -> TrainConfig:
    return TrainConfig(head=head, epochs=settings.epochs, batch_size=settings.batch_size,
                       learning_rate=settings.learning_rate, folds=settings.folds, seed=settings.seed)


def train_and_log(mlflow, registered_model: str, head: str, config: TrainConfig, images: np.ndarray,
                  labels: np.ndarray, n_classes: int, dataset_version: str, log) -> tuple[CrossValResult, dict]:
    """Cross-validate one head inside an MLflow run; log params, per-fold/epoch metrics and the model."""
    device = pick_device()
    with mlflow.start_run(run_name=f"{head}-{dataset_version[:8]}") as run:
        mlflow.set_tags({"dataset_version": dataset_version, "head": head, "device": device.type})
        mlflow.log_params({**asdict(config), "n_images": len(labels), "n_classes": n_classes})

        def on_epoch(event: dict) -> None:
            mlflow.log_metric(f"train_loss_fold{event['fold']}", event["train_loss"], step=event["epoch"])

        result = cross_validate(images, labels, n_classes, config, device=device, on_epoch=on_epoch)
        for fold, accuracy in enumerate(result.fold_accuracy):
            mlflow.log_metric("heldout_accuracy_fold", accuracy, step=fold)
        heldout_accuracy = result.accuracy(labels)
        mlflow.log_metric("heldout_accuracy", heldout_accuracy)
        log.info(f"{head}: out-of-fold accuracy {heldout_accuracy:.4f} against the given labels")
        ensemble = FoldEnsemble(result.models).eval()
        example = images[:2]
        info = mlflow.pytorch.log_model(
            ensemble, name="model", input_example=example, registered_model_name=registered_model,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
        model_version = str(info.registered_model_version)
        mlflow.MlflowClient().set_model_version_tag(registered_model, model_version, "dataset_version", dataset_version)
        mlflow.MlflowClient().set_model_version_tag(registered_model, model_version, "head", head)
    return result, {"head": head, "run_id": run.info.run_id, "model_version": model_version,
                    "heldout_accuracy": heldout_accuracy}


@dg.asset(
    deps=[curated_dataset],
    group_name="training",
    kinds={"pytorch", "mlflow"},
    description="K-fold cross-validated CNNs, one MLflow run per head (softmax, L2-softmax), each registered; "
                "out-of-fold probabilities and embeddings for every curated image.",
)
def cv_models(context: dg.AssetExecutionContext, audit_home: AuditHome, dvc: DvcRepo,
              mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    settings = audit_home.settings()
    dataset_version = dvc.version_of("curated")
    rows, images = load_curated(audit_home.curated)
    labels = rows["label"].map(settings.class_index()).to_numpy(np.int64)
    mlflow = mlflow_tracking.start()
    runs = []
    for head in settings.heads:
        result, run = train_and_log(mlflow, mlflow_tracking.registered_model, head, _train_config(settings, head),
                                    images, labels, len(settings.classes), dataset_version, context.log)
        save_outputs(audit_home.models, ModelOutputs(dataset_version, head, rows["image_id"].to_numpy(),
                                                     result.probs, result.embeddings, result.fold), run)
        runs.append(run)
    selected = max(runs, key=lambda r: r["heldout_accuracy"])
    selection = {"dataset_version": dataset_version, "selected": selected, "runs": runs}
    atomic_write_bytes(audit_home.models / dataset_version / "selection.json", json.dumps(selection, indent=2).encode())
    context.log.info(f"selected head {selected['head']} (held-out accuracy {selected['heldout_accuracy']:.4f})")
    return dg.MaterializeResult(metadata={
        "dataset_version": dataset_version,
        "selected_head": selected["head"],
        "model_version": selected["model_version"],
        "mlflow_run_id": selected["run_id"],
        **{f"heldout_accuracy_{r['head']}": r["heldout_accuracy"] for r in runs},
    })
