"""Benchmark of the vendor estimates against the truth, beside cleanlab's baseline on the same
out-of-fold probabilities. Scenarios use real images (Fashion-MNIST, scikit-learn's digits)."""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, roc_auc_score

from ml.audit import run_audit
from ml.datasets import load_dataset
from ml.simulate import simulate_labels
from ml.train import TrainConfig, cross_validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    dataset: str
    vendors: dict[str, float]
    per_vendor: int
    noise: str = "uniform"
    ambiguous: float = 0.0
    epochs: int | None = None  # None: the benchmark's default


SCENARIOS = {s.key: s for s in [
    Scenario("A", "reference: 3 x 2,000, uniform errors", "fashion-mnist", {"a": 0.0, "b": 0.05, "c": 0.2}, 2000),
    Scenario("B", "systematic pair confusions", "fashion-mnist", {"clean": 0.0, "pairs10": 0.10, "pairs25": 0.25},
             2000, noise="pairs"),
    Scenario("C", "5 vendors x 1,000, close rates", "fashion-mnist",
             {"v00": 0.0, "v02": 0.02, "v05": 0.05, "v10": 0.10, "v20": 0.20}, 1000),
    Scenario("D", "10% ambiguous (two overlaid classes)", "fashion-mnist", {"a": 0.0, "b": 0.05, "c": 0.2}, 2000,
             ambiguous=0.10),
    Scenario("E", "digits (8x8 upscaled), 3 x 550", "digits", {"a": 0.0, "b": 0.05, "c": 0.2}, 550),
    Scenario("W", "weak model: reference case, 2 epochs", "fashion-mnist", {"a": 0.0, "b": 0.05, "c": 0.2}, 2000,
             epochs=2),
]}


@dataclass
class BenchConfig:
    seeds: int = 10
    folds: int = 3
    epochs: int = 8
    head: str = "l2softmax"
    bootstrap: int = 100
    cache: Path | None = None
    train_batch: dict = field(default_factory=lambda: {"fashion-mnist": 128, "digits": 32})
    digits_epochs: int = 20


def _model_outputs(scenario: Scenario, seed: int, sim, n_classes: int, config: BenchConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """Out-of-fold probabilities and embeddings, cached per scenario, seed and training settings."""
    epochs = scenario.epochs or (config.digits_epochs if scenario.dataset == "digits" else config.epochs)
    tag = f"{scenario.key}-s{seed}-{config.head}-f{config.folds}-e{epochs}.npz"
    path = config.cache / tag if config.cache else None
    if path is not None and path.is_file():
        with np.load(path) as saved:
            return saved["probs"], saved["embeddings"], float(saved["seconds"])
    started = time.perf_counter()
    train_config = TrainConfig(head=config.head, epochs=epochs, folds=config.folds, seed=seed,
                               batch_size=config.train_batch[scenario.dataset])
    result = cross_validate(sim.images[..., None], sim.given, n_classes, train_config)
    seconds = time.perf_counter() - started
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, probs=result.probs, embeddings=result.embeddings, seconds=seconds)
        path.write_bytes(buffer.getvalue())
    return result.probs, result.embeddings, seconds


def _detection(flags: np.ndarray, wrong: np.ndarray) -> tuple[float, float, float]:
    tp = float((flags & wrong).sum())
    precision = tp / max(flags.sum(), 1)
    recall = tp / max(wrong.sum(), 1)
    return precision, recall, 2 * precision * recall / max(precision + recall, 1e-12)


def _ranking_metrics(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, list[bool]]:
    exact = float(np.array_equal(np.argsort(estimate, kind="stable"), np.argsort(truth, kind="stable")))
    pairs = [bool(np.sign(estimate[i] - estimate[j]) == np.sign(truth[i] - truth[j]))
             for i in range(len(truth)) for j in range(i + 1, len(truth)) if abs(truth[i] - truth[j]) >= 0.03]
    return exact, pairs


def run_seed(scenario: Scenario, seed: int, config: BenchConfig) -> dict:
    """Every figure of one scenario and seed (rates in fractions)."""
    data = load_dataset(scenario.dataset)
    sim = simulate_labels(data, scenario.vendors, scenario.per_vendor, seed, scenario.noise, scenario.ambiguous)
    probs, embeddings, train_seconds = _model_outputs(scenario, seed, sim, len(data.classes), config)
    started = time.perf_counter()
    rows = pd.DataFrame({"image_id": [f"{sim.vendors[v]}/b/{i}" for i, v in enumerate(sim.vendor)],
                         "vendor": np.array(sim.vendors)[sim.vendor], "batch": "b",
                         "label": np.array(data.classes)[sim.given]})
    result, issues = run_audit(rows, probs, embeddings, data.classes, n_boot=config.bootstrap, seed=seed)
    audit_seconds = time.perf_counter() - started
    order = [result.vendors.index(v) for v in sim.vendors]  # run_audit sorts vendor names
    estimate, low, high = result.rates.rate[order], result.rates.low[order], result.rates.high[order]
    wrong = sim.wrong
    truth = np.array([wrong[sim.vendor == v].mean() for v in range(len(sim.vendors))])
    baseline_rate = result.baseline_rates[order]
    baseline_flags = issues["cleanlab_flag"].to_numpy()
    flags = issues["verdict"].to_numpy() == "error"
    worst = sim.vendor == int(np.argmax(truth))
    p_error = issues["p_error"].to_numpy()
    baseline_score = 1 - probs[np.arange(len(sim.given)), sim.given]
    predicted = probs.argmax(axis=1)
    exact, pairs = _ranking_metrics(estimate, truth)
    baseline_exact, baseline_pairs = _ranking_metrics(baseline_rate, truth)
    ambiguous = sim.ambiguous
    return {
        "truth": truth, "estimate": estimate, "low": low, "high": high, "baseline": baseline_rate,
        "exact_ranking": exact, "pairs": pairs, "baseline_exact_ranking": baseline_exact, "baseline_pairs": baseline_pairs,
        "detection": _detection(flags, wrong), "baseline_detection": _detection(baseline_flags, wrong),
        "worst_f1": _detection(flags[worst], wrong[worst])[2],
        "baseline_worst_f1": _detection(baseline_flags[worst], wrong[worst])[2],
        "auroc": roc_auc_score(wrong, p_error), "ap": average_precision_score(wrong, p_error),
        "baseline_auroc": roc_auc_score(wrong, baseline_score), "baseline_ap": average_precision_score(wrong, baseline_score),
        "ambiguous_billed": float(flags[ambiguous].mean()) if ambiguous.any() else np.nan,
        "baseline_ambiguous_billed": float(baseline_flags[ambiguous].mean()) if ambiguous.any() else np.nan,
        "top1": float((predicted == sim.true[:, 0]).mean()),
        "set_accuracy": float(((predicted == sim.true[:, 0]) | (predicted == sim.true[:, 1])).mean()),
        "seconds": train_seconds + audit_seconds,
    }


def summarize(scenario: Scenario, runs: list[dict]) -> dict:
    """Aggregate the per-seed figures of one scenario."""
    stack = {k: np.array([r[k] for r in runs]) for k in ("truth", "estimate", "low", "high", "baseline")}
    abs_error = 100 * np.abs(stack["estimate"] - stack["truth"])  # (seeds, vendors), points
    baseline_error = 100 * np.abs(stack["baseline"] - stack["truth"])
    covered = (stack["low"] <= stack["truth"] + 1e-12) & (stack["truth"] <= stack["high"] + 1e-12)

    def mean(key: str) -> float:  # nan when no seed has the figure (no ambiguous images in the scenario)
        values = np.array([r[key] for r in runs], dtype=float)
        return float(np.nanmean(values)) if np.isfinite(values).any() else np.nan

    def mean_of(key: str, index: int) -> float:
        return float(np.mean([r[key][index] for r in runs]))

    pairs = [p for r in runs for p in r["pairs"]]
    baseline_pairs = [p for r in runs for p in r["baseline_pairs"]]
    return {
        "scenario": scenario.key, "title": scenario.title, "seeds": len(runs), "vendors": list(scenario.vendors),
        "mean_estimate": 100 * stack["estimate"].mean(axis=0), "mean_baseline": 100 * stack["baseline"].mean(axis=0),
        "mean_truth": 100 * stack["truth"].mean(axis=0),
        "mae_per_vendor": abs_error.mean(axis=0), "baseline_mae_per_vendor": baseline_error.mean(axis=0),
        "mae": float(abs_error.mean()), "baseline_mae": float(baseline_error.mean()),
        "coverage": float(covered.mean()), "mean_width": float(100 * (stack["high"] - stack["low"]).mean()),
        # for vendors with no error at all: how often the interval reaches 0 (to 0.05 points)
        "zero_reached": float((stack["low"][stack["truth"] == 0] <= 5e-4).mean()) if (stack["truth"] == 0).any() else np.nan,
        "exact_ranking": mean("exact_ranking"), "baseline_exact_ranking": mean("baseline_exact_ranking"),
        "pair_accuracy": float(np.mean(pairs)) if pairs else np.nan,
        "baseline_pair_accuracy": float(np.mean(baseline_pairs)) if baseline_pairs else np.nan,
        "precision": mean_of("detection", 0), "recall": mean_of("detection", 1), "f1": mean_of("detection", 2),
        "baseline_precision": mean_of("baseline_detection", 0), "baseline_recall": mean_of("baseline_detection", 1),
        "baseline_f1": mean_of("baseline_detection", 2), "worst_f1": mean("worst_f1"),
        "baseline_worst_f1": mean("baseline_worst_f1"),
        "auroc": mean("auroc"), "ap": mean("ap"), "baseline_auroc": mean("baseline_auroc"), "baseline_ap": mean("baseline_ap"),
        "ambiguous_billed": mean("ambiguous_billed"), "baseline_ambiguous_billed": mean("baseline_ambiguous_billed"),
        "top1": mean("top1"), "set_accuracy": mean("set_accuracy"), "seconds": float(np.sum([r["seconds"] for r in runs])),
    }


def _pct(values) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


def format_tables(summaries: list[dict]) -> str:
    """Markdown: a vendor-rate table and a detection table, ours beside cleanlab's (``ours | cleanlab``)."""
    rates = ["| scenario | seeds | vendors | true rate % | estimated % (ours \\| cleanlab) | MAE per vendor, points (ours \\| cleanlab) "
             "| MAE all | 95% coverage | mean width | 0% vendor: interval reaches 0 | exact ranking | pair order (>=3 pts) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    detect = ["| scenario | precision | recall | F1 | F1 worst vendor | AUROC | AP | ambiguous billed | top-1 acc | set acc | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        zero = "n/a" if np.isnan(s["zero_reached"]) else f"{100 * s['zero_reached']:.0f}%"
        rates.append(
            f"| {s['scenario']} {s['title']} | {s['seeds']} | {', '.join(s['vendors'])} | {_pct(s['mean_truth'])} "
            f"| {_pct(s['mean_estimate'])} \\| {_pct(s['mean_baseline'])} "
            f"| {_pct(s['mae_per_vendor'])} \\| {_pct(s['baseline_mae_per_vendor'])} "
            f"| {s['mae']:.2f} \\| {s['baseline_mae']:.2f} | {100 * s['coverage']:.0f}% | {s['mean_width']:.1f} "
            f"| {zero} "
            f"| {100 * s['exact_ranking']:.0f}% \\| {100 * s['baseline_exact_ranking']:.0f}% "
            f"| {100 * s['pair_accuracy']:.0f}% \\| {100 * s['baseline_pair_accuracy']:.0f}% |")

        def both(key: str, digits: int = 2) -> str:
            a, b = s[key], s[f"baseline_{key}"]
            return "n/a" if np.isnan(a) else f"{a:.{digits}f} \\| {b:.{digits}f}"

        detect.append(
            f"| {s['scenario']} | {both('precision')} | {both('recall')} | {both('f1')} | {both('worst_f1')} "
            f"| {both('auroc')} | {both('ap')} | {both('ambiguous_billed')} | {s['top1']:.3f} | {s['set_accuracy']:.3f} "
            f"| {s['seconds']:.0f} |")
    return "\n".join(["### Vendor error rates", "", *rates, "", "### Detection of wrong labels", "", *detect, ""])


def run_benchmark(keys: list[str], config: BenchConfig) -> list[dict]:
    summaries = []
    for key in keys:
        scenario = SCENARIOS[key]
        runs = []
        for seed in range(config.seeds):
            log.info("scenario %s seed %d/%d", key, seed + 1, config.seeds)
            runs.append(run_seed(scenario, seed, config))
        summaries.append(summarize(scenario, runs))
        log.info("scenario %s done:\n%s", key, format_tables(summaries[-1:]))
    return summaries
