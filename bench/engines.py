"""Benchmark of the engines: the same photos' backbone features computed in this process (engine
``local``) and by a Ray Data actor pool on a local Ray cluster (engine ``ray``), in one run: seconds,
images/s, Ray's start-up, and the largest difference between the two results; and the photos' ingestion
(PNG files decoded, checked and hashed) by both engines, whose results must be identical.

The photos are written as delivery files of 2,000 and memory-mapped, as ingestion leaves them, so
Ray's actors read them from disk as they would in a home; for ingestion, as one delivery of PNG files.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
PER_DELIVERY = 2_000


def _as_deliveries(images: np.ndarray, folder: Path):
    from ml.image_stack import ImageStack

    files = []
    for start in range(0, len(images), PER_DELIVERY):
        files.append(folder / f"delivery-{start // PER_DELIVERY:04d}.npy")
        np.save(files[-1], images[start:start + PER_DELIVERY])
    return ImageStack.open(files)


def _as_png_delivery(images: np.ndarray, folder: Path):
    """The photos as a vendor delivers them: one PNG file each and labels.csv (one class for all)."""
    from PIL import Image

    from ml.delivery import Delivery

    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image.squeeze()).save(folder / f"{i:06d}.png")
    (folder / "labels.csv").write_text("image,label\n" + "".join(f"{i:06d}.png,photo\n" for i in range(len(images))))
    return Delivery("bench", "photos", folder)


def _time_ingestion(delivery, image_size: int, channels: int, engine):
    """(seconds, result) of ingesting ``delivery`` on ``engine``, its folder's stamp taken before."""
    from ml.delivery import ingest_delivery, stamp_delivery

    stamp = stamp_delivery(delivery.folder)
    started = time.perf_counter()
    result = ingest_delivery(delivery, ("photo",), image_size, channels, stamp=stamp, engine=engine)
    return time.perf_counter() - started, result


def measure_engines(images: np.ndarray, backbone_name: str = "efficientnet_lite0", weights: str = "auto",
                    num_cpus: int | None = None) -> dict:
    """Features of uint8 ``images`` (N, H, W, C) by both engines, then their ingestion from PNG files.
    Returns images, seconds and images/s of each (Ray's start-up apart from its pipeline), Ray's total
    over the local time, the largest absolute and relative difference between the two feature arrays,
    and the ingestion's seconds and images/s by each engine (on the Ray already started)."""
    from ml.backbones import image_side_and_channels, load_backbone
    from ml.engine import RAY, Engine
    from ml.features import extract_features
    from ml.ray_features import ray_session

    num_cpus = num_cpus or len(os.sched_getaffinity(0))
    side, channels = image_side_and_channels(images)
    backbone = load_backbone(backbone_name, weights, image_side=side)
    with tempfile.TemporaryDirectory() as folder:
        stack = _as_deliveries(images, Path(folder))
        log.info("engines: %d photos, local", len(images))
        started = time.perf_counter()
        local = extract_features(backbone, stack, None)[0]
        local_s = time.perf_counter() - started
        delivery = _as_png_delivery(images, Path(folder) / "landing")
        ingest_local_s, ingested_here = _time_ingestion(delivery, side, channels, Engine())
        log.info("engines: %d photos, ray on a local %d-CPU cluster", len(images), num_cpus)
        started = time.perf_counter()
        with ray_session(num_cpus=num_cpus):
            start_s = time.perf_counter() - started
            on_ray = extract_features(backbone, stack, None, engine=Engine(RAY))[0]
            pipeline_s = time.perf_counter() - started - start_s
            ingest_ray_s, ingested_on_ray = _time_ingestion(delivery, side, channels, Engine(RAY))
    if not (ingested_on_ray.accepted.equals(ingested_here.accepted)
            and ingested_on_ray.quarantine.equals(ingested_here.quarantine)
            and np.array_equal(ingested_on_ray.images, ingested_here.images)):
        raise RuntimeError("ingestion on Ray did not give the local rows, quarantine and images")
    difference = np.abs(on_ray - local)
    return {"images": len(images), "backbone": backbone_name, "cpus": num_cpus, "local_s": local_s,
            "local_per_s": len(images) / local_s, "ray_start_s": start_s, "ray_pipeline_s": pipeline_s,
            "ray_per_s": len(images) / pipeline_s, "ray_over_local": (start_s + pipeline_s) / local_s,
            "max_abs_difference": float(difference.max()),
            "max_relative_difference": float((difference / np.maximum(np.abs(local), 1e-3)).max()),
            "ingest_local_s": ingest_local_s, "ingest_local_per_s": len(images) / ingest_local_s,
            "ingest_ray_s": ingest_ray_s, "ingest_ray_per_s": len(images) / ingest_ray_s}


def format_engines(results: list[dict], command: str) -> str:
    from ml.delivery import DECODE_BATCH

    lines = [f"## `{command}`", "",
             f"Backbone features of CIFAR-10 photos ({results[0]['backbone']}, delivery files of {PER_DELIVERY:,}, "
             f"memory-mapped) by engine `local` (this process, torch on all {results[0]['cpus']} cores) and engine "
             f"`ray` (a local {results[0]['cpus']}-CPU Ray cluster started for the run: one actor per CPU, one torch "
             "thread each), in the same run, CPU.", "",
             "| photos | local (s) | local images/s | Ray start-up (s) | Ray pipeline (s) | Ray images/s "
             "| Ray total / local | largest difference (absolute / relative) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['images']:,} | {r['local_s']:.1f} | {r['local_per_s']:.0f} | {r['ray_start_s']:.1f} | "
                     f"{r['ray_pipeline_s']:.1f} | {r['ray_per_s']:.0f} | {r['ray_over_local']:.2f}x | "
                     f"{r['max_abs_difference']:.1e} / {r['max_relative_difference']:.1e} |")
    lines += ["", "Ingestion of the same photos delivered as PNG files (read, checked, decoded, hashed; the "
              "folder's stamp apart) by engine `local` (this process, one core) and engine `ray` (Ray Data "
              f"tasks of {DECODE_BATCH} files on the cluster already started above), with identical rows and images.",
              "",
              "| photos | local (s) | local images/s | Ray (s) | Ray images/s |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['images']:,} | {r['ingest_local_s']:.1f} | {r['ingest_local_per_s']:.0f} | "
                     f"{r['ingest_ray_s']:.1f} | {r['ingest_ray_per_s']:.0f} |")
    return "\n".join(lines) + "\n"
