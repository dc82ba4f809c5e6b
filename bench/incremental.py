"""Benchmark of the incremental flow: time from a new delivery's _READY to the refreshed scorecard when
a model exists, beside a full re-run (retrain and re-score everything), as batches accumulate."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.accuracy import SCENARIOS
from ml.config import load_settings, write_settings
from ml.datasets import load_dataset
from ml.simulate import simulate_deliveries

# vendors and their error rates, taking turns to deliver: the accuracy benchmark's reference cases
VENDORS = {"fashion-mnist": SCENARIOS["A"].vendors, "cifar10": SCENARIOS["P"].vendors}


def _land(home: Path, data, number: int, per_batch: int, vendors: dict[str, float]) -> None:
    vendor = list(vendors)[number % len(vendors)]
    simulate_deliveries(data, {vendor: vendors[vendor]}, per_batch, home, seed=1000 + number,
                        batch=f"batch-{number:03d}")


def run_incremental_benchmark(home: Path, checkpoints: list[int], per_batch: int, full_up_to: int,
                              settings_overrides: dict, run_audit, dataset: str = "fashion-mnist",
                              source: Path | None = None) -> list[dict]:
    """Land batches one by one; at each checkpoint (number of batches already ingested) time one
    incremental run (a new batch, scored by the champion) and, up to ``full_up_to``, a full re-run.
    ``dataset``: fashion-mnist (3 vendors) or cifar10 photos (4 vendors; ``source`` as for simulate)."""
    data = load_dataset(dataset, source)
    vendors = VENDORS[dataset]
    _land(home, data, 0, per_batch, vendors)
    write_settings(home, replace(load_settings(home), **settings_overrides))
    run_audit(home)  # the first model
    rows, landed = [], 1
    for checkpoint in sorted(checkpoints):
        if landed < checkpoint:  # fill up to the checkpoint, untimed: one run ingests every batch landed
            while landed < checkpoint:
                _land(home, data, landed, per_batch, vendors)
                landed += 1
            run_audit(home)
        _land(home, data, landed, per_batch, vendors)
        started = time.perf_counter()
        run_audit(home)
        incremental = time.perf_counter() - started
        landed += 1
        full = np.nan
        if checkpoint <= full_up_to:
            started = time.perf_counter()
            run_audit(home, retrain=True)
            full = time.perf_counter() - started
        rows.append({"batches_ingested": checkpoint, "images": checkpoint * per_batch,
                     "incremental_s": incremental, "full_rerun_s": full})
    return rows


def format_incremental(rows: list[dict], command: str, note: str) -> str:
    lines = ["## Incremental scoring", "", f"`{command}` ({note})", "",
             "| batches already ingested | images | new batch: _READY to scorecard (s) | full re-run (s) |",
             "|---|---|---|---|"]
    for r in rows:
        full = "not run" if np.isnan(r["full_rerun_s"]) else f"{r['full_rerun_s']:.0f}"
        lines.append(f"| {r['batches_ingested']} | {r['images']} | {r['incremental_s']:.1f} | {full} |")
    return "\n".join(lines) + "\n"
