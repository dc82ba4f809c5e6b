"""A delivery's image files decoded on a Ray cluster: the files to decode stream as a Ray Data
pipeline of plain CPU tasks, each decoding, checking and hashing a batch of files with the local
path's own function (:func:`ml.delivery.decode_files`), so every file gives the same pixels, digest or
reason whichever engine decoded it.

The driver holds only what the local path holds: the decoded uint8 images, placed by position
whatever order the batches come back in. The workers read the files from the delivery's folder (a
cluster's workers must see the same paths). An image that cannot be used is a reason to quarantine
its row, as on the local path; any other failure (a worker lost after its retries, a file that
cannot be read) raises :class:`RayIngestError`, and the caller writes nothing.

Ray is imported only here, and only when called: the local engine needs none of it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from ml.delivery import DECODE_BATCH, DecodedFiles, decode_files
from ml.images import ImageLimits
from ml.ray_features import root_cause

log = logging.getLogger(__name__)

# a batch whose worker dies is run again this many times, not forever (Ray Data's default): a file
# that kills its decoder must fail the delivery, not hang it
RETRIES = 3


class RayIngestError(RuntimeError):
    """Decoding a delivery on Ray failed for another reason than an image's; the message says which
    delivery and why."""


def _decode_batch(batch: dict[str, np.ndarray], image_size: int, channels: int,
                  limits: ImageLimits | None) -> dict[str, np.ndarray]:
    """One batch in a Ray task: ``at`` and ``path`` (B,) in; ``at``, ``pixels`` uint8 (B, S, S, C),
    ``sha256`` and ``reason`` (B,) out."""
    decoded = decode_files(list(batch["path"]), image_size, channels, limits)
    # fixed-width strings: Arrow stores them as text (an object column would be pickled)
    return {"at": batch["at"], "pixels": decoded.pixels, "sha256": decoded.sha256.astype(str),
            "reason": decoded.reasons.astype(str)}


def decode_files_on_ray(paths: Sequence[Path], image_size: int, channels: int, limits: ImageLimits | None,
                        into: DecodedFiles, name: str, batch_size: int = DECODE_BATCH) -> Iterator[int]:
    """Decode ``paths`` (N,) on Ray into ``into`` (an :class:`ml.delivery.DecodedFiles` of N), as
    :func:`ml.delivery.decode_files` would here, ``batch_size`` files per task; yield the number of
    files placed after each batch. Ray must be initialised (:func:`ml.ray_features.ray_session`).

    Parameters
    ----------
    paths : (N,) image files, readable by the cluster's workers at these paths.
    image_size, channels, limits : as :func:`ml.images.decode_image` takes them.
    into : DecodedFiles with N rows, filled by position.
    name : what is decoded, for the error's message (``delivery vendor.batch``).

    Raises
    ------
    RayIngestError
        A task failed for another reason than an image's, after Ray's retries.
    """
    import ray

    if not len(paths):
        return
    items = [{"at": at, "path": str(path)} for at, path in enumerate(paths)]
    # one block per batch: free CPUs take blocks as they come, and Ray Data's backpressure keeps only a
    # few decoded batches waiting for the driver
    with warnings.catch_warnings():
        # Ray 2.60 names no parameter for max_retries and warns that the keyword goes in Ray 2.64 (the
        # project pins 2.60; an upgrade that drops it fails here, loudly)
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        batches = ray.data.from_items(items, override_num_blocks=-(-len(items) // batch_size)).map_batches(
            _decode_batch, batch_size=batch_size, batch_format="numpy", num_cpus=1, max_retries=RETRIES,
            fn_kwargs=dict(image_size=image_size, channels=channels, limits=limits))
    log.info("%s: %d image files to decode on Ray, %d per task", name, len(paths), batch_size)
    placed = np.zeros(len(paths), bool)
    try:
        for batch in batches.iter_batches(batch_size=None, batch_format="numpy"):
            into.place(batch["at"], batch["pixels"], batch["sha256"], batch["reason"])
            placed[batch["at"]] = True
            yield int(placed.sum())
    except Exception as exc:  # the caller must not write a partial delivery
        raise RayIngestError(f"{name}: decoding on Ray failed with {placed.sum()} of {len(paths)} image files "
                             f"decoded: {root_cause(exc)}") from exc
    if not placed.all():
        raise RayIngestError(f"{name}: decoding on Ray returned {placed.sum()} of {len(paths)} image files")
