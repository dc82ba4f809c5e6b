"""Model files and model outputs on disk, always addressed by dataset version, head or model version.

``models/<dataset_version>/``: ``oof-<head>.npz`` (out-of-fold outputs), ``ensemble-<head>.pt`` (the
fold models' weights, loaded with ``weights_only=True``), ``run-<head>.json``, ``selection.json``.
``scores/<model_version>/<vendor>/<batch>.npz``: a later delivery scored by that registered model.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ml.engine import Engine
from ml.files import atomic_write_bytes
from ml.train import FoldEnsemble, ensemble_from_payload, ensemble_payload, member_for_content, score_out_of_sample


class ModelFileError(RuntimeError):
    """A model file is missing, unreadable, or does not fit the taxonomy."""


@dataclass
class ModelOutputs:
    """``image_ids`` (N,), ``probs`` (N, K), ``embeddings`` (N, D), ``fold`` (N,) (-1: scored, not trained on)."""

    image_ids: np.ndarray
    probs: np.ndarray
    embeddings: np.ndarray
    fold: np.ndarray


def _npz_bytes(outputs: ModelOutputs) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, image_ids=outputs.image_ids.astype(str), probs=outputs.probs,
             embeddings=outputs.embeddings, fold=outputs.fold)
    return buffer.getvalue()


def _load_npz(path: Path) -> ModelOutputs:
    with np.load(path, allow_pickle=False) as data:
        return ModelOutputs(data["image_ids"], data["probs"], data["embeddings"], data["fold"])


def save_outputs(models_dir: Path, dataset_version: str, head: str, outputs: ModelOutputs, run: dict) -> None:
    folder = models_dir / dataset_version
    atomic_write_bytes(folder / f"oof-{head}.npz", _npz_bytes(outputs))
    atomic_write_bytes(folder / f"run-{head}.json", json.dumps(run, indent=2).encode())


def load_outputs(models_dir: Path, dataset_version: str, head: str) -> ModelOutputs:
    return _load_npz(models_dir / dataset_version / f"oof-{head}.npz")


def load_image_ids(models_dir: Path, dataset_version: str, head: str) -> np.ndarray:
    """(N,) ids of the images a head was trained on; reads only that array of the outputs file."""
    with np.load(models_dir / dataset_version / f"oof-{head}.npz", allow_pickle=False) as data:
        return data["image_ids"]


def load_selection(models_dir: Path, dataset_version: str) -> dict | None:
    path = models_dir / dataset_version / "selection.json"
    return json.loads(path.read_text()) if path.is_file() else None


def save_ensemble(models_dir: Path, dataset_version: str, head: str, ensemble: FoldEnsemble,
                  classes: tuple[str, ...]) -> Path:
    """The fold models' weights and shape, as plain tensors and strings (no pickled code)."""
    payload = ensemble_payload(ensemble, classes, head)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    path = models_dir / dataset_version / f"ensemble-{head}.pt"
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_ensemble(models_dir: Path, dataset_version: str, head: str, classes: tuple[str, ...],
                  feature_cache: Path | None = None, engine: Engine = Engine()) -> torch.nn.Module:
    """Load an ensemble with ``weights_only=True``; a clear error if it is missing, broken or was
    trained on another class list. ``feature_cache``: where a probe ensemble reads and adds its
    backbone's features (the training's cache); ``engine`` (:class:`ml.engine.Engine`): where it
    computes those of new images."""
    path = models_dir / dataset_version / f"ensemble-{head}.pt"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if list(payload["classes"]) != list(classes):
            raise ModelFileError(f"{path}: the model's classes {payload['classes']} differ from the taxonomy "
                                 f"{list(classes)}; retrain (vendor-audit run --retrain)")
        ensemble = ensemble_from_payload(payload, len(classes), feature_cache, engine)
    except ModelFileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to read the weights means the same to the user
        raise ModelFileError(f"{path}: cannot load the model ({exc.__class__.__name__}: {exc})") from exc
    return ensemble


def score_new_delivery(ensemble: FoldEnsemble, rows: pd.DataFrame, images: np.ndarray, trained: ModelOutputs,
                       curated_rows: pd.DataFrame) -> ModelOutputs:
    """Out-of-sample outputs for a delivery the champion did not train on: ``rows`` (N, with image_id and
    sha256) and their uint8 ``images`` (N, H, W, C).

    An image whose content the champion trained on (the same file delivered again, by the same or
    another vendor) takes that image's out-of-fold outputs: the fold model that never saw this content.
    Scoring it with the fold models that did would read back the labels they learned. Every other
    image is scored by one fold model chosen by its content (:func:`ml.train.score_out_of_sample`).
    ``trained`` are the champion's out-of-fold outputs; ``curated_rows`` give their images' content.
    ``fold`` in the result is the fold model behind each image's outputs.
    """
    content = rows["sha256"].astype(str).to_numpy()
    trained_content = curated_rows.set_index("image_id")["sha256"].reindex(trained.image_ids.astype(str))
    position = pd.Series(np.arange(len(trained_content)), index=trained_content.to_numpy())
    position = position[~position.index.duplicated()]
    match = position.reindex(content).to_numpy()
    seen = ~np.isnan(match)
    take = match[seen].astype(int)
    member = member_for_content(content, len(ensemble.members))
    member[seen] = trained.fold[take]
    probs = np.zeros((len(rows), trained.probs.shape[1]))
    embeddings = np.zeros((len(rows), trained.embeddings.shape[1]), np.float32)
    probs[seen], embeddings[seen] = trained.probs[take], trained.embeddings[take]
    if (~seen).any():
        probs[~seen], embeddings[~seen] = score_out_of_sample(ensemble, images[~seen], member[~seen])
    return ModelOutputs(rows["image_id"].to_numpy(), probs, embeddings, member)


def batch_scores_path(root: Path, model_version: str, vendor: str, batch: str) -> Path:
    return root / "scores" / f"v{model_version}" / vendor / f"{batch}.npz"


def save_batch_scores(path: Path, outputs: ModelOutputs) -> None:
    atomic_write_bytes(path, _npz_bytes(outputs))


def champion_outputs(root: Path, champion: dict, rows: pd.DataFrame) -> tuple[ModelOutputs, np.ndarray, list[str]]:
    """The champion's outputs for curated ``rows`` (columns image_id, vendor, batch), aligned with them:
    out-of-fold where it was trained on the image, else its score of the image's delivery.

    Returns the outputs, the per-image source (``out-of-fold`` or ``new delivery``; empty where the
    champion has not scored the delivery yet) and the keys of such unscored deliveries.
    """
    oof = load_outputs(root / "models", champion["dataset_version"], champion["head"])
    image_ids = rows["image_id"].to_numpy().astype(str)
    n, k = len(image_ids), oof.probs.shape[1]
    probs, embeddings = np.zeros((n, k)), np.zeros((n, oof.embeddings.shape[1]), np.float32)
    fold, source = np.full(n, -1), np.full(n, "", dtype=object)
    position = pd.Series(np.arange(len(oof.image_ids)), index=oof.image_ids.astype(str))
    found = position.reindex(image_ids)
    known = found.notna().to_numpy()
    take = found[known].astype(int).to_numpy()
    probs[known], embeddings[known], fold[known] = oof.probs[take], oof.embeddings[take], oof.fold[take]
    source[known] = "out-of-fold"
    unscored = []
    later = rows[~known]
    for (vendor, batch), group in later.groupby(["vendor", "batch"], sort=True):
        path = batch_scores_path(root, champion["model_version"], vendor, batch)
        if not path.is_file():
            unscored.append(f"{vendor}.{batch}")
            continue
        scored = _load_npz(path)
        where = pd.Series(np.arange(len(scored.image_ids)), index=scored.image_ids.astype(str))
        members = group.index.to_numpy()
        take = where.reindex(group["image_id"].astype(str)).to_numpy()
        if np.isnan(take).any():
            unscored.append(f"{vendor}.{batch}")
            continue
        take = take.astype(int)
        probs[members], embeddings[members] = scored.probs[take], scored.embeddings[take]
        source[members] = "new delivery"
    return ModelOutputs(image_ids, probs, embeddings, fold), source.astype(str), unscored
