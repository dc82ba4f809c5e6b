"""Benchmark of the vendor estimates against the truth, beside cleanlab's baseline on the same
out-of-fold probabilities. Scenarios use real images (Fashion-MNIST, scikit-learn's digits)."""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from ml.audit import run_audit
from ml.scorecard import MIN_IMAGES_TO_RATE, compare_vendors
from ml.datasets import load_dataset
from ml.simulate import copy_confident_mistakes, label_by_workers, simulate_labels
from ml.train import (FLOAT32, PROBE, FoldEnsemble, TrainConfig, cross_validate, member_for_content, pick_device,
                      resolve_precision, score_out_of_sample, train_folds)

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
    late: int = 0  # images per vendor delivered after training (scenario L), out of per_vendor
    backbone: str = "small_cnn"  # ml.backbones name; small_cnn is trained from scratch
    training: str = "scratch"  # scratch, probe or finetune (ml.train)
    # real workers' labels (CIFAR-10N) instead of simulated errors: one ml.simulate.WORKER_SOURCES per vendor
    worker_sources: tuple[str, ...] = ()
    # vendors that copy the classifier's confident mistakes on this share of their images
    copies: dict[str, float] = field(default_factory=dict)

    def simulate(self, data, seed: int):
        """The vendors' labels for ``seed`` (before any copied mistakes: those need the model's outputs)."""
        if self.worker_sources:
            from ml.datasets import load_cifar10_workers

            return label_by_workers(data, load_cifar10_workers(), dict(zip(self.vendors, self.worker_sources)),
                                    self.per_vendor, seed)
        return simulate_labels(data, self.vendors, self.per_vendor, seed, self.noise, self.ambiguous)


PHOTO_VENDORS = {"a": 0.0, "b": 0.05, "c": 0.10, "d": 0.20}
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
    Scenario("N", "no perfect vendor: 3 x 2,000 at 3 / 8 / 15%", "fashion-mnist", {"a": 0.03, "b": 0.08, "c": 0.15},
             2000),
    Scenario("S500", "small vendors: 3 x 500", "fashion-mnist", {"a": 0.0, "b": 0.05, "c": 0.2}, 500),
    Scenario("S100", "small vendors: 3 x 100", "fashion-mnist", {"a": 0.0, "b": 0.05, "c": 0.2}, 100),
    Scenario("L", "late deliveries: 3 x 2,000 trained, then a byte copy and 1,000 new images of each",
             "fashion-mnist", {"a": 0.0, "b": 0.05, "c": 0.2}, 3000, late=1000),
    # photos (CIFAR-10 from $CIFAR10_NPZ, or torchvision's downloader): not in the default run
    Scenario("P", "photos: 4 x 2,000 CIFAR-10, uniform errors; efficientnet_lite0 probe", "cifar10",
             PHOTO_VENDORS, 2000, backbone="efficientnet_lite0", training="probe"),
    Scenario("P2", "photos: 4 x 2,000 CIFAR-10, pair confusions; efficientnet_lite0 probe", "cifar10",
             PHOTO_VENDORS, 2000, noise="pairs", backbone="efficientnet_lite0", training="probe"),
    Scenario("PN", "photos: scenario P's photos, no perfect vendor (3 / 8 / 12 / 20%); efficientnet_lite0 probe",
             "cifar10", {"a": 0.03, "b": 0.08, "c": 0.12, "d": 0.20}, 2000, backbone="efficientnet_lite0",
             training="probe"),
    Scenario("PS", "photos: scenario P's photos, small_cnn from scratch", "cifar10", PHOTO_VENDORS, 2000),
    Scenario("H", "photos labelled by real workers (CIFAR-10N): original / majority of 3 / one worker / worst "
             "of 3; efficientnet_lite0 probe", "cifar10", {"orig": 0.0, "majority": 0.0, "worker": 0.0, "worst": 0.0},
             2000, backbone="efficientnet_lite0", training="probe",
             worker_sources=("original", "majority", "worker", "worst")),
    Scenario("HP", "photos where real workers split: the majority's label against a minority's; "
             "efficientnet_lite0 probe", "cifar10", {"orig": 0.0, "majority": 0.0, "minority": 0.0}, 2000,
             backbone="efficientnet_lite0", training="probe",
             worker_sources=("original", "split-majority", "split-minority")),
    Scenario("I", "photos, errors the model cannot see: two vendors copy the classifier's confident mistakes on "
             "1% / 5%; efficientnet_lite0 probe", "cifar10", {"a": 0.0, "copy1": 0.0, "copy5": 0.0, "d": 0.10}, 2000,
             backbone="efficientnet_lite0", training="probe", copies={"copy1": 0.01, "copy5": 0.05}),
    # for a GPU: on 2 CPU cores its 5 x 8 epochs of fine-tuning take hours
    Scenario("PF", "photos: scenario P's photos, efficientnet_lite0 fine-tuned", "cifar10", PHOTO_VENDORS, 2000,
             backbone="efficientnet_lite0", training="finetune"),
]}


@dataclass
class BenchConfig:
    seeds: int = 10
    folds: int = 3
    epochs: int = 8
    head: str = "l2softmax"
    precision: str = "auto"  # of the training steps, as the setting (ml.train.resolve_precision)
    bootstrap: int = 100
    cache: Path | None = None
    train_batch: dict = field(default_factory=lambda: {"fashion-mnist": 128, "digits": 32, "cifar10": 128})
    digits_epochs: int = 20


def _epochs(scenario: Scenario, config: BenchConfig) -> int:
    return scenario.epochs or (config.digits_epochs if scenario.dataset == "digits" else config.epochs)


def _precision(config: BenchConfig, training: str = "scratch") -> tuple[str, str]:
    """(precision, cache-tag suffix) of a training: the resolved precision (a probe's heads always train in
    float32); float32 outputs keep the tags they were cached under before bfloat16 training existed."""
    precision = FLOAT32 if training == PROBE else resolve_precision(config.precision, pick_device())[0]
    return precision, "" if precision == FLOAT32 else f"-{precision}"


def _model_outputs(scenario: Scenario, seed: int, sim, n_classes: int, config: BenchConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """Out-of-fold probabilities and embeddings, cached per scenario, seed and training settings."""
    epochs = _epochs(scenario, config)
    model = "" if scenario.training == "scratch" else f"-{scenario.backbone}-{scenario.training}"
    precision, suffix = _precision(config, scenario.training)
    tag = f"{scenario.key}-s{seed}-{config.head}-f{config.folds}-e{epochs}{model}{suffix}.npz"
    path = config.cache / tag if config.cache else None
    if path is not None and path.is_file():
        with np.load(path) as saved:
            return saved["probs"], saved["embeddings"], float(saved["seconds"])
    started = time.perf_counter()
    train_config = TrainConfig(head=config.head, epochs=epochs, folds=config.folds, seed=seed,
                               batch_size=config.train_batch[scenario.dataset], backbone=scenario.backbone,
                               weights="none" if scenario.training == "scratch" else "auto",
                               training=scenario.training, precision=precision)
    images = sim.images[..., None] if sim.images.ndim == 3 else sim.images  # (N, H, W, C)
    # features are cached by image content: the photos a seed shares with another are computed once
    features = config.cache / "features" if config.cache else None
    result = train_folds(images, sim.given, n_classes, train_config, feature_cache=features)
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
    sim = scenario.simulate(data, seed)
    probs, embeddings, train_seconds = _model_outputs(scenario, seed, sim, len(data.classes), config)
    sim = copy_confident_mistakes(sim, probs, scenario.copies) if scenario.copies else sim
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
    claims, wrong_claims = _claims(result, dict(zip(sim.vendors, truth)))
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
        "claims": claims, "wrong_claims": wrong_claims,
        "rated": float((result.rates.n_images >= MIN_IMAGES_TO_RATE).mean()),
    }


def _claims(result, truth: dict[str, float]) -> tuple[int, int]:
    """Significant pairwise conclusions (Holm) and how many of them contradict the truth (a vendor
    called better whose true rate is not lower)."""
    comparisons = compare_vendors(result.vendors, result.rates)
    claims = comparisons[comparisons["conclusion"].str.contains(" has fewer errors than ")]
    wrong = 0
    for conclusion in claims["conclusion"]:
        better, worse = conclusion.split(" has fewer errors than ")
        wrong += truth[better] >= truth[worse]
    return len(claims), int(wrong)


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
        "claims": float(np.sum([r["claims"] for r in runs])), "wrong_claims": float(np.sum([r["wrong_claims"] for r in runs])),
        "rated": mean("rated"),
    }


def _pct(values) -> str:
    return " / ".join(f"{v:.1f}" for v in values)


def format_tables(summaries: list[dict]) -> str:
    """Markdown: a vendor-rate table and a detection table, ours beside cleanlab's (``ours | cleanlab``)."""
    rates = ["| scenario | seeds | vendors | true rate % | estimated % (ours \\| cleanlab) | MAE per vendor, points (ours \\| cleanlab) "
             "| MAE all | 95% coverage | mean width | 0% vendor: interval reaches 0 | exact ranking | pair order (>=3 pts) "
             "| vendors rated | significant claims (wrong) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
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
            f"| {100 * s['pair_accuracy']:.0f}% \\| {100 * s['baseline_pair_accuracy']:.0f}% "
            f"| {100 * s['rated']:.0f}% | {s['claims']:.0f} ({s['wrong_claims']:.0f}) |")

        def both(key: str, digits: int = 2) -> str:
            a, b = s[key], s[f"baseline_{key}"]
            return "n/a" if np.isnan(a) else f"{a:.{digits}f} \\| {b:.{digits}f}"

        detect.append(
            f"| {s['scenario']} | {both('precision')} | {both('recall')} | {both('f1')} | {both('worst_f1')} "
            f"| {both('auroc')} | {both('ap')} | {both('ambiguous_billed')} | {s['top1']:.3f} | {s['set_accuracy']:.3f} "
            f"| {s['seconds']:.0f} |")
    return "\n".join(["### Vendor error rates", "", *rates, "", "### Detection of wrong labels", "", *detect, ""])


def run_benchmark(keys: list[str], config: BenchConfig) -> tuple[list[dict], list[dict]]:
    """Summaries of the rate scenarios and of the late-delivery scenarios among ``keys``."""
    summaries, late = [], []
    for key in keys:
        scenario = SCENARIOS[key]
        runs = []
        for seed in range(config.seeds):
            log.info("scenario %s seed %d/%d", key, seed + 1, config.seeds)
            runs.append((run_late_seed if scenario.late else run_seed)(scenario, seed, config))
        if scenario.late:
            late.append(summarize_late(scenario, runs))
            log.info("scenario %s done:\n%s", key, format_late_table(late[-1]))
        else:
            summaries.append(summarize(scenario, runs))
            log.info("scenario %s done:\n%s", key, format_tables(summaries[-1:]))
    return summaries, late


# ---- scenario L: deliveries that land after training -----------------------------------------------

def _content_keys(images: np.ndarray) -> np.ndarray:
    """(N,) sha256 hex of each image's pixels: the content key the product derives from the file."""
    return np.array([hashlib.sha256(image.tobytes()).hexdigest() for image in images])


@torch.no_grad()
def _fold_ensemble_scores(models, images: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """(N, K) mean of every fold model's probabilities: how later deliveries were scored before."""
    ensemble = FoldEnsemble(models).eval()
    return np.concatenate([ensemble(torch.from_numpy(images[i:i + batch_size])).numpy()
                           for i in range(0, len(images), batch_size)]).astype(np.float64)


def _late_outputs(scenario: Scenario, seed: int, sim, trained: np.ndarray, keys: np.ndarray, n_classes: int,
                  config: BenchConfig) -> dict[str, np.ndarray]:
    """Train on the ``trained`` images only; score the others (late) with one fold model each (as the
    product does) and with the mean of the fold models (as before); score the trained images' copies
    with the mean of the fold models, most of which trained on them (as before). Cached like the others."""
    epochs = _epochs(scenario, config)
    precision, suffix = _precision(config)
    tag = f"{scenario.key}-s{seed}-{config.head}-f{config.folds}-e{epochs}{suffix}.npz"
    path = config.cache / tag if config.cache else None
    if path is not None and path.is_file():
        with np.load(path) as saved:
            return dict(saved)
    started = time.perf_counter()
    train_config = TrainConfig(head=config.head, epochs=epochs, folds=config.folds, seed=seed,
                               batch_size=config.train_batch[scenario.dataset], precision=precision)
    images = sim.images[..., None]
    result = cross_validate(images[trained], sim.given[trained], n_classes, train_config)
    ensemble = FoldEnsemble(result.models).eval()
    late = ~trained
    late_probs, late_embeddings = score_out_of_sample(ensemble, images[late],
                                                      member_for_content(keys[late], config.folds))
    outputs = {"probs": result.probs, "embeddings": result.embeddings, "late_probs": late_probs,
               "late_embeddings": late_embeddings, "late_ensemble": _fold_ensemble_scores(result.models, images[late]),
               "copy_ensemble": _fold_ensemble_scores(result.models, images[trained]),
               "seconds": np.array(time.perf_counter() - started)}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.savez(buffer, **outputs)
        path.write_bytes(buffer.getvalue())
    return outputs


def run_late_seed(scenario: Scenario, seed: int, config: BenchConfig) -> dict:
    """Each vendor's original delivery (trained on, out-of-fold), a byte copy of it and a delivery of new
    images at the same error rate, both landed after training and scored by the champion; audited the
    product's way and the previous way (fold-ensemble scores, noise mixture over every image)."""
    data = load_dataset(scenario.dataset)
    sim = simulate_labels(data, scenario.vendors, scenario.per_vendor, seed, scenario.noise, scenario.ambiguous)
    position = np.arange(len(sim.given)) - np.searchsorted(sim.vendor, sim.vendor)  # index within its vendor
    trained = position < scenario.per_vendor - scenario.late
    keys = _content_keys(sim.images)
    out = _late_outputs(scenario, seed, sim, trained, keys, len(data.classes), config)
    names = np.array(sim.vendors)
    classes = np.array(data.classes)
    original, late = np.flatnonzero(trained), np.flatnonzero(~trained)
    order = np.concatenate([original, original, late])
    part = np.repeat(["", "-copy", "-late"], [len(original), len(original), len(late)])
    vendor_name = np.char.add(names[sim.vendor[order]], part)
    rows = pd.DataFrame({"image_id": [f"{v}/b/{i}" for v, i in zip(vendor_name, order)], "vendor": vendor_name,
                         "batch": "b", "label": classes[sim.given[order]], "sha256": keys[order]})
    was_trained = np.arange(len(order)) < len(original)
    embeddings = np.concatenate([out["embeddings"], out["embeddings"], out["late_embeddings"]])
    wrong = sim.wrong[order]
    truth = pd.Series(wrong).groupby(vendor_name).mean()
    figures = {}
    for method, probs, trained_mask, frame in (
            ("now", np.concatenate([out["probs"], out["probs"], out["late_probs"]]), was_trained, rows),
            ("before", np.concatenate([out["probs"], out["copy_ensemble"], out["late_ensemble"]]), None,
             rows.drop(columns="sha256"))):
        result, _ = run_audit(frame, probs, embeddings, data.classes, n_boot=config.bootstrap, seed=seed,
                              trained=trained_mask)
        rate = dict(zip(result.vendors, result.rates.rate))
        low, high = dict(zip(result.vendors, result.rates.low)), dict(zip(result.vendors, result.rates.high))
        comparisons = compare_vendors(result.vendors, result.rates)
        significant = set(map(tuple, comparisons.loc[comparisons["conclusion"].str.contains(" has fewer errors "),
                                                     ["vendor_a", "vendor_b"]].values))
        for v in sim.vendors:
            for suffix in ("-copy", "-late"):
                pair = tuple(sorted((v, v + suffix)))
                figures[(method, v, suffix)] = {
                    "difference": rate[v + suffix] - rate[v], "claimed": pair in significant,
                    "covered": low[v + suffix] <= truth[v + suffix] <= high[v + suffix]}
        if method == "now":  # the originals audited alone: how far the later deliveries moved them
            alone, _ = run_audit(rows[was_trained], out["probs"], out["embeddings"], data.classes,
                                 n_boot=config.bootstrap, seed=seed)
            for i, v in enumerate(alone.vendors):
                width = alone.rates.high[i] - alone.rates.low[i]
                figures[("move", v)] = abs(rate[v] - alone.rates.rate[i]) / max(width, 1e-9)
    return {"figures": figures, "vendors": list(sim.vendors), "truth": truth.to_dict()}


def summarize_late(scenario: Scenario, runs: list[dict]) -> dict:
    vendors = runs[0]["vendors"]
    table = {}
    for method in ("now", "before"):
        for suffix in ("-copy", "-late"):
            cells = [[r["figures"][(method, v, suffix)] for r in runs] for v in vendors]
            table[(method, suffix)] = {
                "difference": [100 * np.mean([c["difference"] for c in cell]) for cell in cells],
                "abs_difference": [100 * np.mean([abs(c["difference"]) for c in cell]) for cell in cells],
                "claimed": float(np.mean([c["claimed"] for cell in cells for c in cell])),
                "covered": float(np.mean([c["covered"] for cell in cells for c in cell])),
            }
    move = [r["figures"][("move", v)] for r in runs for v in vendors]
    return {"scenario": scenario.key, "title": scenario.title, "seeds": len(runs), "vendors": vendors,
            "table": table, "max_move": float(np.max(move)), "mean_move": float(np.mean(move))}


def format_late_table(summary: dict) -> str:
    lines = [f"### {summary['scenario']} {summary['title']} ({summary['seeds']} seeds)", "",
             "Rate of each later delivery minus its original's, per vendor "
             f"({', '.join(summary['vendors'])}), in points; `now` is the product, `before` the previous scoring "
             "(mean of the fold models, noise mixture over every image).", "",
             "| delivery | scored | mean difference | mean absolute difference | pairs called different | "
             "interval covers its truth |", "|---|---|---|---|---|---|"]
    for suffix, label in (("-copy", "byte copy"), ("-late", "new images, same rate")):
        for method in ("now", "before"):
            cell = summary["table"][(method, suffix)]
            lines.append(f"| {label} | {method} | {_pct(cell['difference'])} | {_pct(cell['abs_difference'])} "
                         f"| {100 * cell['claimed']:.0f}% | {100 * cell['covered']:.0f}% |")
    lines += ["", f"The later deliveries moved the originals' rates by at most {100 * summary['max_move']:.0f}% "
              f"(mean {100 * summary['mean_move']:.0f}%) of their interval's width.", ""]
    return "\n".join(lines)
