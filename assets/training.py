"""K-fold training of each classifier head, logged to MLflow; the champion alias moves only on improvement."""

import json
import warnings
from dataclasses import asdict

import dagster as dg
import numpy as np
import torch

from assets.dataset import curated_dataset
from ml.backbones import choose_backbone, image_side_and_channels, load_backbone
from ml.delivery import load_curated
from ml.files import atomic_write_bytes
from ml.train import (FLOAT32, SCRATCH, CrossValResult, TrainConfig, pick_device, resolve_heads, resolve_precision,
                      resolve_training, train_folds)
from pipelines.locks import TRAINING_POOL
from pipelines.resources import AuditHome, DvcRepo, MlflowTracking
from pipelines.store import ModelOutputs, champion_outputs, load_selection, save_ensemble, save_outputs


class TrainingConfig(dg.Config):
    force: bool = False  # retrain even when this dataset version has been trained already


def _train_config(settings, head: str, backbone: str = "small_cnn", weights: str = "none",
                  training: str = SCRATCH, precision: str = FLOAT32) -> TrainConfig:
    return TrainConfig(head=head, epochs=settings.epochs, batch_size=settings.batch_size,
                       learning_rate=settings.learning_rate, folds=settings.folds, seed=settings.seed,
                       backbone=backbone, weights=weights, training=training, precision=precision,
                       engine=settings.engine, ray_address=settings.ray_address)


def plan_training(settings, images: np.ndarray, log) -> tuple[str, str, str, str, tuple[str, ...]]:
    """(backbone, weights, training mode, precision, heads) for these images, each choice logged with its
    reason."""
    side, channels = image_side_and_channels(images)
    choice = choose_backbone(settings.backbone, settings.weights, side, channels)
    device = pick_device()
    mode, why = resolve_training(settings.training, choice.name, device)
    precision, why_precision = resolve_precision(settings.precision, device)
    heads, why_heads = resolve_heads(settings.heads, mode)
    log.info(f"backbone {choice.name} (weights {choice.weights}): {choice.reason}; training {mode} on {device.type}: "
             f"{why}; precision {precision}: {why_precision}; heads {', '.join(heads)}: {why_heads}")
    return choice.name, choice.weights, mode, precision, heads


def log_dataset_input(mlflow, rows, dataset_version: str, source: str) -> None:
    """The curated dataset as the run's input (MLflow's Dataset column): its rows (image_id, vendor,
    batch, label), named by the DVC version as digest and the DVC remote as source."""
    import mlflow.data

    frame = rows[["image_id", "vendor", "batch", "label"]].reset_index(drop=True)
    with warnings.catch_warnings():
        # MLflow registers its local-folder source under two schemes and warns that a folder path
        # matches both; they are the same class, so the choice does not matter
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        dataset = mlflow.data.from_pandas(frame, source=source, name="curated", digest=dataset_version[:36])
    mlflow.log_input(dataset, context="training")


def train_and_log(mlflow, registered_model: str, config: TrainConfig, images: np.ndarray, labels: np.ndarray,
                  classes: tuple[str, ...], dataset_version: str, log, feature_cache=None,
                  backbone=None, dataset=None) -> tuple[CrossValResult, dict, torch.nn.Module]:
    """Cross-validate one head inside an MLflow run; log params, per-fold/epoch metrics (folds 1..K),
    device, backbone, training mode, throughput and peak memory, the dataset input (``dataset``: its
    rows and source, see :func:`log_dataset_input`), and the model."""
    device = pick_device()
    # on the run and on the registered version alike
    model_tags = {"dataset_version": dataset_version, "head": config.head, "backbone": config.backbone,
                  "weights": config.weights, "training": config.training}
    with mlflow.start_run(run_name=f"{config.head}-{dataset_version[:8]}") as run:
        if dataset is not None:
            rows, source = dataset
            log_dataset_input(mlflow, rows, dataset_version, source)
        mlflow.set_tags({**model_tags, "device": device.type})
        mlflow.log_params({**asdict(config), "n_images": len(labels), "n_classes": len(classes), "device": device.type})

        def on_epoch(event: dict) -> None:
            mlflow.log_metric(f"train_loss_fold{event['fold']}", event["train_loss"], step=event["epoch"])

        result = train_folds(images, labels, len(classes), config, device=device, on_epoch=on_epoch,
                             feature_cache=feature_cache, backbone=backbone)
        # one metric per fold, beside the overall one: the run comparison view shows them side by side
        heldout_accuracy = result.accuracy(labels)
        mlflow.log_metrics({"heldout_accuracy": heldout_accuracy,
                            **{f"heldout_accuracy_fold{fold}": accuracy
                               for fold, accuracy in enumerate(result.fold_accuracy, start=1)}})
        mlflow.log_metrics({k: float(v) for k, v in result.stats.items() if isinstance(v, (int, float))})
        mlflow.set_tags({k: str(v) for k, v in result.stats.items() if isinstance(v, str)})
        log.info(f"{config.head}: out-of-fold accuracy {heldout_accuracy:.4f} against the given labels "
                 f"({config.training}, {config.backbone}, {result.stats.get('train_images_per_s')} images/s on "
                 f"{device.type}, peak memory {result.stats.get('peak_memory_mb')} MB)")
        ensemble = result.ensemble.eval()
        info = mlflow.pytorch.log_model(  # pt2 (torch.export) format: loading runs no pickled code
            ensemble, name="model", input_example=images[:2], registered_model_name=registered_model,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        )
        model_version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        for key, value in model_tags.items():
            client.set_model_version_tag(registered_model, model_version, key, value)
    return result, {"head": config.head, "run_id": run.info.run_id, "model_version": model_version,
                    "heldout_accuracy": heldout_accuracy, "backbone": config.backbone, "weights": config.weights,
                    "training": config.training}, ensemble


def champion_accuracy(audit_home: AuditHome, champion: dict, rows, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """The champion's accuracy against the given labels on the images it has outputs for, and that mask."""
    outputs, source, _ = champion_outputs(audit_home.root, champion, rows)
    covered = source != ""
    return float((outputs.probs[covered].argmax(axis=1) == labels[covered]).mean()), covered


@dg.asset(
    deps=[curated_dataset],
    group_name="vendor_audit",
    kinds={"pytorch", "mlflow"},
    pool=TRAINING_POOL,  # one training at a time
    description="K-fold cross-validated classifiers (the backbone and training mode the settings or the images "
                "choose: small CNN from scratch, frozen pretrained features with trained heads, or fine-tuning), "
                "one MLflow run per head (softmax, L2-softmax), each registered; "
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
    backbone_name, weights, mode, precision, heads = plan_training(settings, images, context.log)
    # loaded once for every head; the feature cache makes a second head's features free
    backbone = None if mode == SCRATCH else load_backbone(backbone_name, weights, image_side_and_channels(images)[0])
    for head in heads:
        result, run, ensemble = train_and_log(mlflow, mlflow_tracking.registered_model,
                                              _train_config(settings, head, backbone_name, weights, mode,
                                                            precision),
                                              images, labels, settings.classes, dataset_version, context.log,
                                              feature_cache=audit_home.features, backbone=backbone,
                                              dataset=(rows, dvc.version_location(dataset_version)))
        outputs = ModelOutputs(rows["image_id"].to_numpy(), result.probs, result.embeddings, result.fold)
        save_outputs(audit_home.models, dataset_version, head, outputs, run)
        save_ensemble(audit_home.models, dataset_version, head, ensemble, settings.classes)
        runs.append(run)
        predictions[head] = result.probs.argmax(axis=1)
    best = max(runs, key=lambda r: r["heldout_accuracy"])
    trained = ", ".join(f"v{r['model_version']} {r['head']} {r['heldout_accuracy']:.4f}" for r in runs)
    decision = f"no champion before: the best held-out accuracy of this training's heads ({trained})"
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
        "backbone": backbone_name, "weights": weights, "training": mode,
    })
