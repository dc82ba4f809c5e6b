"""Backbone features computed on a Ray cluster: the rows to compute stream as a Ray Data pipeline
through a pool of actors, each holding the backbone once, on a local Ray started for the call or on
an existing cluster (``ray_address``).

The driver never holds the images: actors read them from the memory-mapped delivery files (a
cluster's workers must see the same paths) or, for an in-memory array, from Ray's object store.
Results are placed by row, whatever order they come back in. A worker that dies mid-way is
replaced and its blocks recomputed (Ray Data retries them); a pipeline that still fails raises
:class:`RayFeaturesError`, and the caller writes nothing to the feature cache.

Ray is imported only here, and only when called: the local engine needs none of it.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml.image_stack import ImageStack

log = logging.getLogger(__name__)


class RayFeaturesError(RuntimeError):
    """Feature extraction on Ray failed after its retries; the message says where and why."""


# inside held_ray(): how deep, and whether a ray_session started (or joined) the Ray the block holds
_held = {"depth": 0, "started": False}


@contextmanager
def held_ray():
    """For the block, the first :func:`ray_session` that starts (or joins) a Ray leaves it up for the
    ones after it, and the end of the block stops it: one Ray for every job of an audit (each delivery's
    ingestion, the training, the scoring) where each would start its own, a local one taking seconds.
    Nothing is started where no ray_session runs (the local engine)."""
    _held["depth"] += 1
    try:
        yield
    finally:
        _held["depth"] -= 1
        if not _held["depth"] and _held["started"]:
            _held["started"] = False
            import ray

            ray.shutdown()


@contextmanager
def ray_session(address: str = "", num_cpus: int | None = None):
    """Ray for the duration of the block: connected to ``address`` (``auto`` or ``ray://host:port``),
    or, when empty, a local Ray started here (``num_cpus``: its CPUs; None: the cores this process may
    use) and stopped after, or at the end of an enclosing :func:`held_ray`. An already initialised Ray
    is used as it is and left running."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # "local": a new instance even where RAY_ADDRESS or a `ray start` cluster on this machine would
        # otherwise be joined, so that an empty setting means what the settings file says
        ray.init(address="local", num_cpus=num_cpus or len(os.sched_getaffinity(0)), include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    if _held["depth"]:
        _held["started"] = True
        yield ray
        return
    try:
        yield ray
    finally:
        ray.shutdown()


class _FeatureActor:
    """One backbone per actor, taken from the object store once; ``__call__`` turns a batch of rows
    into their features."""

    def __init__(self, backbone_ref, images_ref, files: list[str] | None, batch_size: int,
                 pid_folder: str | None):
        import ray
        import torch

        from ml.features import compute_features

        if pid_folder:  # which processes hold actors, for whoever must find one (a fault test)
            Path(pid_folder, str(os.getpid())).touch()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.backbone = ray.get(backbone_ref)
        self.images = ImageStack.open([Path(f) for f in files]) if files else ray.get(images_ref)
        self.batch_size = batch_size
        self.compute = compute_features

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = batch["data"]  # ray.data.from_numpy's column
        features = self.compute(self.backbone, self.images, self.device, self.batch_size, rows=rows)
        return {"row": rows, "features": features}


# a traceback's exception line ("IsADirectoryError: [Errno 21] ...", unindented, unlike the source
# lines), not one of Ray's own wrappers
_EXCEPTION_LINE = re.compile(r"^(?!ray\.)[A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt): ")


def root_cause(exc: BaseException) -> str:
    """The cause of a Ray error, without terminal colours: the last exception line of the worker's
    traceback that Ray wraps (Ray Data adds lines of its own after it, about retries), else the
    error's last line (a lost worker has no traceback)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    causes = [line.strip() for line in text.splitlines() if _EXCEPTION_LINE.match(line)]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return causes[-1] if causes else lines[-1] if lines else type(exc).__name__


def image_files(images) -> list[str] | None:
    """The ``.npy`` files behind a memory-mapped :class:`ImageStack` (None for an in-memory array)."""
    if isinstance(images, ImageStack) and all(getattr(p, "filename", None) for p in images.parts):
        return [str(p.filename) for p in images.parts]
    return None


@dataclass(frozen=True)
class ActorPlan:
    """How many feature actors, what each holds, and the rows each batch carries."""

    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    batch_size: int


GPU_BATCH = 256  # a GPU takes a large batch in one pass; on a CPU core larger batches gain nothing
CPU_BATCH = 64


def plan_actors(resources: dict[str, float]) -> ActorPlan:
    """One actor per GPU where the cluster has GPUs (``resources`` as ``ray.cluster_resources()``
    gives them), each with a GPU and a batch of ``GPU_BATCH``; otherwise one per CPU, each with a CPU
    and a batch of ``CPU_BATCH``."""
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return ActorPlan(gpus, 1.0, 0.0, GPU_BATCH)
    return ActorPlan(max(1, int(resources.get("CPU", 1))), 0.0, 1.0, CPU_BATCH)


def compute_features_on_ray(backbone, images, rows: np.ndarray, plan: ActorPlan | None = None,
                            pid_folder: Path | None = None) -> np.ndarray:
    """Features (len(rows), D) float32 of ``images`` (an array or an ImageStack) at ``rows``, as
    :func:`ml.features.compute_features` gives them, computed by Ray actors as ``plan`` says (None:
    :func:`plan_actors` for the cluster). Ray must be initialised (:func:`ray_session`).

    Raises
    ------
    RayFeaturesError
        The pipeline failed after Ray's retries (a worker lost for good, an actor that cannot start).
    """
    import ray

    rows = np.asarray(rows, np.int64)
    out = np.zeros((len(rows), backbone.feature_dim), np.float32)
    if not len(rows):
        return out
    if len(np.unique(rows)) != len(rows):
        raise ValueError("rows to compute must be distinct")
    plan = plan or plan_actors(ray.cluster_resources())
    batch_size = plan.batch_size
    files = image_files(images)
    images_ref = None if files else ray.put(np.asarray(images))
    position = np.full(int(rows.max()) + 1, -1)
    position[rows] = np.arange(len(rows))
    # one block per batch of rows: the pool's actors take blocks as they free up, and Ray Data's
    # backpressure keeps only a few in flight
    blocks = np.array_split(rows, max(1, -(-len(rows) // batch_size)))
    log.info("features of %d images on Ray: %d actors (%s each), %d blocks, images read from %s", len(rows),
             plan.actors, f"{plan.gpus_per_actor:g} GPU" if plan.gpus_per_actor else f"{plan.cpus_per_actor:g} CPU",
             len(blocks), f"{len(files)} delivery files" if files else "the object store")
    features = ray.data.from_numpy(blocks).map_batches(
        _FeatureActor, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor,
        fn_constructor_kwargs=dict(backbone_ref=ray.put(copy.deepcopy(backbone).cpu().eval()), images_ref=images_ref,
                                   files=files, batch_size=batch_size,
                                   pid_folder=str(pid_folder) if pid_folder else None))
    done = np.zeros(len(rows), bool)
    try:
        for batch in features.iter_batches(batch_size=None, batch_format="numpy"):
            at = position[batch["row"]]
            out[at] = batch["features"]
            done[at] = True
    except Exception as exc:  # the caller must not cache a partial result
        raise RayFeaturesError(f"feature extraction on Ray failed with {done.sum()} of {len(rows)} images done: "
                               f"{root_cause(exc)}") from exc
    if not done.all():
        raise RayFeaturesError(f"feature extraction on Ray returned {done.sum()} of {len(rows)} images")
    return out
