"""K-fold probe heads trained on a Ray cluster, one task per fold.

The features (N, D) go to the object store once; each task trains its fold's head with the local
path's own function (:func:`ml.train.fit_fold_head`, on one torch thread), so a fold's head and its held-out
outputs are the same to the last bit whichever engine trained it. The per-epoch losses come back
with the head and are handed to the caller's epoch callback in order, once the fold is done.

A task whose worker dies is retried by Ray (``max_retries``); a fold that still fails raises
:class:`RayTrainingError` naming the fold and the cause, and no fold's result is returned.
Ray is imported only here, and only when called.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from ml.ray_features import root_cause

log = logging.getLogger(__name__)

RETRIES = 3  # a fold whose worker dies is run again this many times before the training fails


class RayTrainingError(RuntimeError):
    """A fold's head could not be trained on Ray after its retries; the message says which and why."""


def _fit_fold(features: np.ndarray, labels: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray,
              n_classes: int, config, fold: int):
    """One fold, in a Ray worker: (:class:`ml.train.FittedFold`, the epochs' dicts in order)."""
    import torch

    from ml.train import fit_fold_head

    epochs: list[dict] = []
    with warnings.catch_warnings():
        # the object store's arrays are read-only; the fold only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        x_all, y_all = torch.from_numpy(features), torch.from_numpy(labels.astype(np.int64))
    return fit_fold_head(x_all, y_all, train_idx, test_idx, n_classes, config, fold, epochs.append), epochs


def fit_fold_heads_on_ray(features: np.ndarray, labels: np.ndarray, splits: list[tuple[np.ndarray, np.ndarray]],
                          n_classes: int, config) -> list[tuple]:
    """Every fold's head of ``splits`` ((train, test) index pairs) on ``features`` (N, D) float32 and
    ``labels`` (N,), one Ray task each, in fold order: (:class:`ml.train.FittedFold`, the dicts an epoch
    callback receives, in order) per fold. Ray must be initialised
    (:func:`ml.ray_features.ray_session`).

    Raises
    ------
    RayTrainingError
        A fold failed after Ray's retries.
    """
    import ray

    features_ref = ray.put(np.ascontiguousarray(features, dtype=np.float32))
    labels_ref = ray.put(np.asarray(labels))
    fit = ray.remote(num_cpus=1, max_retries=RETRIES)(_fit_fold)
    pending = [fit.remote(features_ref, labels_ref, train_idx, test_idx, n_classes, config, fold)
               for fold, (train_idx, test_idx) in enumerate(splits)]
    log.info("head=%s: %d fold heads on Ray, one task each", config.head, len(pending))
    fitted = []
    for fold, task in enumerate(pending):
        try:
            fitted.append(ray.get(task))
        except Exception as exc:
            for other in pending[fold + 1:]:
                ray.cancel(other)
            raise RayTrainingError(f"fold {fold + 1}/{len(pending)} head training on Ray failed: "
                                   f"{root_cause(exc)}") from exc
    return fitted
