"""Out-of-fold model outputs on disk, keyed by dataset version and head."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml.delivery import atomic_write_bytes


@dataclass
class ModelOutputs:
    """``image_ids`` (N,), ``probs`` (N, K), ``embeddings`` (N, D), ``fold`` (N,)."""

    dataset_version: str
    head: str
    image_ids: np.ndarray
    probs: np.ndarray
    embeddings: np.ndarray
    fold: np.ndarray


def save_outputs(models_dir: Path, outputs: ModelOutputs, run: dict) -> Path:
    folder = models_dir / outputs.dataset_version
    buffer = io.BytesIO()
    np.savez(buffer, image_ids=outputs.image_ids.astype(str), probs=outputs.probs,
             embeddings=outputs.embeddings, fold=outputs.fold)
    path = folder / f"oof-{outputs.head}.npz"
    atomic_write_bytes(path, buffer.getvalue())
    atomic_write_bytes(folder / f"run-{outputs.head}.json", json.dumps(run, indent=2).encode())
    return path


def load_selection(models_dir: Path, dataset_version: str) -> dict:
    path = models_dir / dataset_version / "selection.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained model for dataset version {dataset_version}; materialize cv_models")
    return json.loads(path.read_text())


def load_outputs(models_dir: Path, dataset_version: str, head: str) -> ModelOutputs:
    with np.load(models_dir / dataset_version / f"oof-{head}.npz", allow_pickle=False) as data:
        return ModelOutputs(dataset_version, head, data["image_ids"], data["probs"], data["embeddings"], data["fold"])
