"""Benchmark of the estimation stages' cost as the collection grows: label issues and rates, scorecard,
check plan and report on 10k to 1M images, with probabilities drawn from a calibrated synthetic
classifier (no training: the stages after it are what grows with every delivery).

Each size runs in a fresh Python process (``python -m bench.scale SIZE BOOTSTRAP``), so its peak
resident memory is its own; the stages run as the product's assets call them.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import subprocess
import sys
import time

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)
SIZES = (10_000, 100_000, 1_000_000)
STAGES = ("label issues and rates", "scorecard", "check plan", "report")
VENDOR_RATES = (0.0, 0.03, 0.08, 0.15)  # four vendors sharing the images equally
PER_DELIVERY = 2_000
N_CLASSES = 10
EMBEDDING_DIM = 128


def synthetic_collection(n_images: int, seed: int = 0, strength: float = 4.5):
    """A calibrated synthetic classifier's outputs on ``n_images`` images and vendors with uniform errors.

    Returns rows (image_id, vendor, batch, label: the product's curated columns), probabilities (N, K)
    float64, L2-normalised embeddings (N, 128) float32 (each class a direction plus noise), the classes
    and the per-image truth ``wrong`` (N,) bool. Generated in blocks of 100,000 so that no (N, K)
    temporary beyond the result is ever held.
    """
    rng = np.random.default_rng(seed)
    k = N_CLASSES
    n_vendors = len(VENDOR_RATES)
    vendor = np.arange(n_images) % n_vendors
    probs = np.empty((n_images, k))
    true = np.empty(n_images, np.int64)
    embeddings = np.empty((n_images, EMBEDDING_DIM), np.float32)
    directions = rng.normal(size=(k, EMBEDDING_DIM)).astype(np.float32)
    mean_noise = float(np.mean(VENDOR_RATES))
    for start in range(0, n_images, 100_000):
        n = min(100_000, n_images - start)
        favoured = rng.integers(0, k, n)
        logits = rng.normal(0, 1.0, (n, k))
        logits[np.arange(n), favoured] += rng.normal(strength, 1.5, n)
        clean = np.exp(logits - logits.max(axis=1, keepdims=True))
        clean /= clean.sum(axis=1, keepdims=True)
        # calibrated: the true class is drawn from the classifier's own probabilities
        t = (rng.random((n, 1)) > clean.cumsum(axis=1)).sum(axis=1).clip(max=k - 1)
        true[start:start + n] = t
        # trained on every vendor's labels, the classifier's outputs carry their mean noise
        probs[start:start + n] = clean * (1 - mean_noise) + (1 - clean) * mean_noise / (k - 1)
        e = directions[t] + rng.normal(0, 1.0, (n, EMBEDDING_DIM)).astype(np.float32)
        embeddings[start:start + n] = e / np.linalg.norm(e, axis=1, keepdims=True)
    wrong = rng.random(n_images) < np.asarray(VENDOR_RATES)[vendor]
    given = np.where(wrong, (true + rng.integers(1, k, n_images)) % k, true)
    classes = tuple(f"class{c}" for c in range(k))
    names = np.array([f"v{v}" for v in range(n_vendors)])
    within = np.arange(n_images) // n_vendors  # each vendor's images in delivery order
    rows = pd.DataFrame({
        "image_id": [f"img{i:07d}" for i in range(n_images)],
        "vendor": names[vendor],
        "batch": [f"batch-{b:04d}" for b in within // PER_DELIVERY],
        "label": np.array(classes)[given],
    })
    return rows, probs, embeddings, classes, wrong


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def measure(n_images: int, n_boot: int, seed: int = 0) -> dict:
    """Seconds per stage (STAGES) and the process's peak resident memory after each, for one size."""
    from ml.audit import run_audit
    from ml.check_plan import draw_check_plan
    from ml.report import build_report, likely_errors
    from ml.scorecard import build_scorecard, compare_vendors

    started = time.perf_counter()
    rows, probs, embeddings, classes, wrong = synthetic_collection(n_images, seed)
    figures = {"n_images": n_images, "bootstrap": n_boot, "inputs_s": time.perf_counter() - started,
               "seconds": {}, "peak_mb": {}}

    def timed(stage: str, work):
        log.info("scale %d: %s", n_images, stage)
        t = time.perf_counter()
        out = work()
        figures["seconds"][stage] = time.perf_counter() - t
        figures["peak_mb"][stage] = _peak_rss_mb()
        return out

    result, issues = timed(STAGES[0], lambda: run_audit(rows, probs, embeddings, classes, n_boot=n_boot, seed=seed))
    vendor = rows["vendor"].map({v: i for i, v in enumerate(result.vendors)}).to_numpy(np.int64)
    card, comparisons = timed(STAGES[1], lambda: (
        build_scorecard(result.vendors, vendor, result.verdicts["verdict"], result.rates),
        compare_vendors(result.vendors, result.rates)))
    timed(STAGES[2], lambda: draw_check_plan(issues, set(), set(), [], budget=100))
    # the report shows thumbnails of a few likely errors: only those images are read
    images = {i: np.zeros((28, 28, 1), np.uint8) for i in likely_errors(issues)["image_id"]}
    timed(STAGES[3], lambda: build_report(card, comparisons, issues, result.model.confusion, result.vendors, classes,
                                          {"images": str(n_images)}, images, pd.DataFrame(columns=["vendor", "batch",
                                                                                                   "reason"]),
                                          0.05, n_boot))
    truth = np.bincount(vendor, weights=wrong, minlength=len(result.vendors)) / np.bincount(vendor)
    figures["mae_points"] = float(100 * np.abs(result.rates.rate - truth).mean())
    return figures


def run_scale_benchmark(sizes=SIZES, n_boot: int = 200) -> list[dict]:
    """:func:`measure` per size, each in its own process (its peak memory its own)."""
    results = []
    for n in sizes:
        log.info("scale: %d images, %d bootstrap refits", n, n_boot)
        done = subprocess.run([sys.executable, "-m", "bench.scale", str(n), str(n_boot)], capture_output=True,
                              text=True)
        if done.returncode:
            raise RuntimeError(f"bench-scale at {n} images failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        log.info("scale: %d images: %s", n, results[-1])
    return results


def slopes(results: list[dict]) -> dict[str, float]:
    """Per stage, the log-log slope of seconds against images between the two largest sizes."""
    if len(results) < 2:
        return {}
    a, b = results[-2], results[-1]
    return {stage: math.log(b["seconds"][stage] / a["seconds"][stage]) / math.log(b["n_images"] / a["n_images"])
            for stage in STAGES}


def format_scale(results: list[dict], command: str) -> str:
    lines = [f"## `{command}`", "",
             f"Synthetic calibrated classifier, {len(VENDOR_RATES)} vendors at "
             f"{' / '.join(f'{100 * r:g}' for r in VENDOR_RATES)}% errors, deliveries of {PER_DELIVERY:,} images, "
             f"{results[0]['bootstrap']} bootstrap refits; each size in its own process, CPU.", "",
             "| images | " + " | ".join(f"{s} (s)" for s in STAGES) + " | total (s) | peak memory (MB) | MAE, points |",
             "|---" * (len(STAGES) + 4) + "|"]
    for r in results:
        total = sum(r["seconds"].values())
        lines.append(f"| {r['n_images']:,} | " + " | ".join(f"{r['seconds'][s]:.1f}" for s in STAGES)
                     + f" | {total:.1f} | {max(r['peak_mb'].values()):.0f} | {r['mae_points']:.2f} |")
    slope = slopes(results)
    if slope:  # a stage of a few hundredths of a second is timer noise, not growth
        lines += ["", f"Log-log slope from {results[-2]['n_images']:,} to {results[-1]['n_images']:,} images: "
                  + ", ".join(f"{s} {v:.2f}" if results[-1]["seconds"][s] >= 1 else f"{s} (under 1 s)"
                              for s, v in slope.items()) + "."]
    return "\n".join(lines) + "\n"


def scale_plot(results: list[dict]) -> bytes:
    """PNG: seconds against images per stage, log-log."""
    from ml.plots import figure_png, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    n = [r["n_images"] for r in results]
    for stage in STAGES:
        ax.plot(n, [r["seconds"][stage] for r in results], marker="o", label=stage)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return figure_png(fig, "Estimation stages: time against images (log-log)")


if __name__ == "__main__":  # one size, in its own process: the figures as one JSON line
    print(json.dumps(measure(int(sys.argv[1]), int(sys.argv[2]))))
