"""K-fold training of each classifier head, logged to MLflow; the champion alias moves only on improvement."""

import json
from dataclasses import asdict

import dagster as dg
import numpy as np
import torch

from assets.dataset import curated_dataset
from ml.delivery import load_curated
from ml.files import atomic_write_bytes
from ml.train import CrossValResult, FoldEnsemble, TrainConfig, cross_validate, pick_device
from pipelines.resources import AuditHome, DvcRepo, MlflowTracking
from pipelines.store import ModelOutputs, champion_outputs, load_selection, save_ensemble, save_outputs


class TrainingConfig(dg.Config):
    force: bool = False  # retrain even when this dataset version has been trained already


def _train_config(settings, head: str) -> TrainConfig:
    return TrainConfig(head=head, epochs=settings.epochs, batch_size=settings.batch_size,
                       learning_rate=settings.learning_rate, folds=settings.folds, seed=settings.seed)


def train_and_log(mlflow, registered_model: str, config: TrainConfig, images: np.ndarray, labels: np.ndarray,
                  classes: tuple[str, ...], dataset_version: str, log) -> tuple[CrossValResult, dict, FoldEnsemble]:
    """Cross-validate one head inside an MLflow run; log params, per-fold/epoch metrics and the model."""
    device = pick_device()
    with mlflow.start_run(run_name=f"{config.head}-{dataset_version[:8]}") as run:
        mlflow.set_tags({"dataset_version": dataset_version, "head": config.head, "device": device.type})
        mlflow.log_params({**asdict(config), "n_images": len(labels), "n_classes": len(classes)})

        def on_epoch(event: dict) -> None:
            mlflow.log_metric(f"train_loss_fold{event['fold']}", event["train_loss"], step=event["epoch"])

        result = cross_validate(images, labels, len(classes), config, device=device, on_epoch=on_epoch)
        for fold, accuracy in enumerate(result.fold_accuracy):
            mlflow.log_metric("heldout_accuracy_fold", accuracy, step=fold)
        heldout_accuracy = result.accuracy(labels)
        mlflow.log_metric("heldout_accuracy", heldout_accuracy)
        log.info(f"{config.head}: out-of-fold accuracy {heldout_accuracy:.4f} against the given labels")
        ensemble = FoldEnsemble(result.models).eval()
        info = mlflow.pytorch.log_model(  # pt2 (torch.export) format: loading runs no pickled code
            ensemble, name="model", input_example=images[:2], registered_model_name=registered_model,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
        model_version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        client.set_model_version_tag(registered_model, model_version, "dataset_version", dataset_version)
        client.set_model_version_tag(registered_model, model_version, "head", config.head)
    return result, {"head": config.head, "run_id": run.info.run_id, "model_version": model_version,
                    "heldout_accuracy": heldout_accuracy}, ensemble


def champion_accuracy(audit_home: AuditHome, champion: dict, rows, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """The champion's accuracy against the given labels on the images it has outputs for, and that mask."""
    outputs, source, _ = champion_outputs(audit_home.root, champion, rows)
    covered = source != ""
    return float((outputs.probs[covered].argmax(axis=1) == labels[covered]).mean()), covered


@dg.asset(
    deps=[curated_dataset],
    group_name="vendor_audit",
    kinds={"pytorch", "mlflow"},
    description="K-fold cross-validated CNNs, one MLflow run per head (softmax, L2-softmax), each registered; "
                "out-of-fold probabilities and embeddings for every curated image. Skipped when this dataset "
                "version is trained already (unless forced). The alias 'champion' moves to the best new "
                "version only if it beats the champion on the same images.",
)
def cv_models(context: dg.AssetExecutionContext, config: TrainingConfig, audit_home: AuditHome, dvc: DvcRepo,
              mlflow_tracking: MlflowTracking) -> dg.MaterializeResult:
    settings = audit_home.settings()
    dataset_version = dvc.version_of("curated")
    previous = load_selection(audit_home.models, dataset_version)
    if previous is not None and not config.force:
        context.log.info(f"dataset version {dataset_version} is trained already: no retraining")
        return dg.MaterializeResult(metadata={"dataset_version": dataset_version, "retrained": False,
                                              "champion_version": previous["champion"]["model_version"]})
    rows, images = load_curated(audit_home.curated)
    labels = rows["label"].map(settings.class_index()).to_numpy(np.int64)
    mlflow = mlflow_tracking.start()
    champion = mlflow_tracking.champion()
    runs, predictions = [], {}
    for head in settings.heads:
        result, run, ensemble = train_and_log(mlflow, mlflow_tracking.registered_model, _train_config(settings, head),
                                              images, labels, settings.classes, dataset_version, context.log)
        outputs = ModelOutputs(rows["image_id"].to_numpy(), result.probs, result.embeddings, result.fold)
        save_outputs(audit_home.models, dataset_version, head, outputs, run)
        save_ensemble(audit_home.models, dataset_version, head, ensemble, settings.classes)
        runs.append(run)
        predictions[head] = result.probs.argmax(axis=1)
    best = max(runs, key=lambda r: r["heldout_accuracy"])
    decision = "first model"
    if champion is not None:
        reference, covered = champion_accuracy(audit_home, champion, rows, labels)
        candidate = float((predictions[best["head"]][covered] == labels[covered]).mean())
        decision = (f"candidate {candidate:.4f} vs champion v{champion['model_version']} {reference:.4f} "
                    f"on the same {int(covered.sum())} images")
        if candidate <= reference:
            context.log.info(f"champion stays v{champion['model_version']}: {decision}")
            best = None
    if best is not None:
        mlflow_tracking.promote(best["model_version"])
        champion = {"model_version": best["model_version"], "dataset_version": dataset_version,
                    "head": best["head"], "run_id": best["run_id"]}
        context.log.info(f"champion is now v{best['model_version']} ({best['head']}): {decision}")
    selection = {"dataset_version": dataset_version, "runs": runs, "champion": champion, "decision": decision}
    atomic_write_bytes(audit_home.models / dataset_version / "selection.json", json.dumps(selection, indent=2).encode())
    return dg.MaterializeResult(metadata={
        "dataset_version": dataset_version,
        "retrained": True,
        "champion_version": champion["model_version"],
        "champion_decision": decision,
        **{f"heldout_accuracy_{r['head']}": r["heldout_accuracy"] for r in runs},
        **{f"model_version_{r['head']}": r["model_version"] for r in runs},
    })
