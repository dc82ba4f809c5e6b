"""Benchmark of the feature engines: the same photos' backbone features computed in this process
(engine ``local``) and by a Ray Data actor pool on a local Ray cluster (engine ``ray``), in one run:
seconds, images/s, Ray's start-up, and the largest difference between the two results.

The photos are written as delivery files of 2,000 and memory-mapped, as ingestion leaves them, so
Ray's actors read them from disk as they would in a home.
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


def measure_engines(images: np.ndarray, backbone_name: str = "efficientnet_lite0", weights: str = "auto",
                    num_cpus: int | None = None) -> dict:
    """Features of uint8 ``images`` (N, H, W, C) by both engines. Returns images, seconds and images/s
    of each (Ray's start-up apart from its pipeline), Ray's total over the local time, and the largest
    absolute and relative difference between the two feature arrays."""
    from ml.backbones import image_side_and_channels, load_backbone
    from ml.features import Engine, extract_features
    from ml.ray_features import ray_session

    num_cpus = num_cpus or len(os.sched_getaffinity(0))
    side, _ = image_side_and_channels(images)
    backbone = load_backbone(backbone_name, weights, image_side=side)
    with tempfile.TemporaryDirectory() as folder:
        stack = _as_deliveries(images, Path(folder))
        log.info("engines: %d photos, local", len(images))
        started = time.perf_counter()
        local = extract_features(backbone, stack, None)[0]
        local_s = time.perf_counter() - started
        log.info("engines: %d photos, ray on a local %d-CPU cluster", len(images), num_cpus)
        started = time.perf_counter()
        with ray_session(num_cpus=num_cpus):
            start_s = time.perf_counter() - started
            on_ray = extract_features(backbone, stack, None, engine=Engine("ray"))[0]
            pipeline_s = time.perf_counter() - started - start_s
    difference = np.abs(on_ray - local)
    return {"images": len(images), "backbone": backbone_name, "cpus": num_cpus, "local_s": local_s,
            "local_per_s": len(images) / local_s, "ray_start_s": start_s, "ray_pipeline_s": pipeline_s,
            "ray_per_s": len(images) / pipeline_s, "ray_over_local": (start_s + pipeline_s) / local_s,
            "max_abs_difference": float(difference.max()),
            "max_relative_difference": float((difference / np.maximum(np.abs(local), 1e-3)).max())}


def format_engines(results: list[dict], command: str) -> str:
    lines = [f"## `{command}`", "",
             f"Backbone features of CIFAR-10 photos ({results[0]['backbone']}, delivery files of {PER_DELIVERY:,}, "
             f"memory-mapped) by engine `local` (this process, torch on all {results[0]['cpus']} cores) and engine "
             f"`ray` (a local {results[0]['cpus']}-CPU Ray cluster started for the run: one actor per CPU, one torch "
             "thread each), in the same run, CPU. Ingestion is not in the figures: it runs in the Dagster process "
             "with either engine.", "",
             "| photos | local (s) | local images/s | Ray start-up (s) | Ray pipeline (s) | Ray images/s "
             "| Ray total / local | largest difference (absolute / relative) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['images']:,} | {r['local_s']:.1f} | {r['local_per_s']:.0f} | {r['ray_start_s']:.1f} | "
                     f"{r['ray_pipeline_s']:.1f} | {r['ray_per_s']:.0f} | {r['ray_over_local']:.2f}x | "
                     f"{r['max_abs_difference']:.1e} / {r['max_relative_difference']:.1e} |")
    return "\n".join(lines) + "\n"
