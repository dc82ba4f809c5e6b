"""Vendor quality over time: is a worsening vendor caught, is an unchanged one left alone, and do the
contract verdicts agree with the truth?

Each seed is one nightly audit of a home where every vendor made 5 deliveries of 1,000 images:

- simulated (Fashion-MNIST, uniform errors): four steady vendors at 0 / 3 / 8 / 20% in every delivery,
  and two that were at 3% for four deliveries and then delivered at 10% or at 15%;
- real annotators (the shared CIFAR-10 photos, CIFAR-10N labels): four vendors labelling as the dataset
  / the workers' majority / one worker / the worst of three did, each vendor's photos split into its
  deliveries at random (real mistakes, quality that did not change).

The classifier is trained once per data set (K-fold, out-of-fold probabilities, on the labels of seed
0) and its outputs are reused: every seed draws which images each vendor delivers, in which delivery,
and (simulated) which labels are wrong. Each image's probabilities come from fold models that never
saw it, as in the nightly loop, where the champion scores new deliveries; what the seeds do not vary
is the training itself.

The worsening test (:func:`ml.deliveries.worsening`) gives a one-sided p-value per vendor; Holm's
adjustment is applied per family as a home would hold it: the four steady vendors together (a false
"worse" is any of them found worse), and each worsening vendor beside those four (caught when it is
found worse among five). Contract verdicts (:func:`ml.contract.contract_verdicts`) are drawn per
vendor and per delivery against limits of 5% and 10%; a ``within`` is contradicted when the true rate
is above the limit, a ``breach`` when it is below.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pandas as pd

from bench.accuracy import BenchConfig, Scenario, _model_outputs
from ml.audit import run_audit
from ml.contract import BREACH, UNDECIDED, WITHIN, contract_verdicts, vendor_limits
from ml.datasets import load_cifar10_workers, load_dataset
from ml.deliveries import LEVEL, delivery_table, with_delivery_contract, worsening
from ml.scorecard import holm, rate_table
from ml.simulate import label_by_workers

log = logging.getLogger(__name__)

DELIVERIES = 5
PER_DELIVERY = 1000
STEADY = {"steady0": 0.0, "steady3": 0.03, "steady8": 0.08, "steady20": 0.20}
WORSENING = {"worse10": 0.10, "worse15": 0.15}  # the fifth delivery's rate, after four at BEFORE_RATE
BEFORE_RATE = 0.03
PHOTO_SOURCES = {"orig": "original", "majority": "majority", "worker": "worker", "worst": "worst"}
LIMITS = (0.05, 0.10)
# the classifiers, trained once (cached as bench.accuracy caches its scenarios')
SIMULATED = Scenario("DRIFT", "drift: 6 vendors x 5 deliveries x 1,000, Fashion-MNIST", "fashion-mnist",
                     {**STEADY, **WORSENING}, DELIVERIES * PER_DELIVERY)
PHOTOS = Scenario("DRIFTH", "drift: 4 real-worker vendors x 5 deliveries x 1,000 photos", "cifar10",
                  {v: 0.0 for v in PHOTO_SOURCES}, DELIVERIES * PER_DELIVERY, backbone="efficientnet_lite0",
                  training="probe", worker_sources=tuple(PHOTO_SOURCES.values()))


@dataclass
class DriftSeed:
    """One seed's audit of one home: ``worsening`` (ml.deliveries.worsening, raw p-values), the truth per
    vendor and delivery, and the contract verdicts per limit."""

    dataset: str
    seed: int
    worsening: pd.DataFrame
    true_difference: dict[str, float]  # vendor -> true newest rate minus true earlier rate
    verdicts: pd.DataFrame  # level (vendor, delivery), name, limit, true_rate, verdict, checks_to_decide
    seconds: float


def delivery_rates(vendors: dict[str, float]) -> dict[str, tuple[float, ...]]:
    """Each simulated vendor's error rate per delivery (steady vendors flat, worsening ones stepping up)."""
    steady = {name: (rate,) * DELIVERIES for name, rate in vendors.items() if name in STEADY}
    worse = {name: (BEFORE_RATE,) * (DELIVERIES - 1) + (rate,) for name, rate in vendors.items() if name in WORSENING}
    return {**steady, **worse}


def _simulated_home(pool: np.ndarray, labels: np.ndarray, n_classes: int, seed: int):
    """Vendor, delivery and given label per pool image for ``seed``: the pool shuffled into the vendors'
    deliveries of PER_DELIVERY images, exactly ``round(rate * PER_DELIVERY)`` wrong labels in each
    (another class, uniformly)."""
    rng = np.random.default_rng(seed)
    rates = delivery_rates(SIMULATED.vendors)
    order = rng.permutation(len(pool))
    vendor = np.repeat(list(rates), DELIVERIES * PER_DELIVERY)
    delivery = np.tile(np.repeat(np.arange(1, DELIVERIES + 1), PER_DELIVERY), len(rates))
    true = labels[order]
    given = true.copy()
    for block, rate in enumerate(r for per_vendor in rates.values() for r in per_vendor):
        members = np.arange(block * PER_DELIVERY, (block + 1) * PER_DELIVERY)
        wrong = rng.choice(members, int(round(rate * PER_DELIVERY)), replace=False)
        given[wrong] = (true[wrong] + rng.integers(1, n_classes, len(wrong))) % n_classes
    return order, vendor, delivery, given, true


def _audit(dataset: str, seed: int, image: np.ndarray, vendor: np.ndarray, delivery: np.ndarray, given: np.ndarray,
           true: np.ndarray, probs: np.ndarray, embeddings: np.ndarray, classes: tuple[str, ...],
           bootstrap: int) -> DriftSeed:
    """Audit one home as the nightly job does and read its worsening test and contract verdicts."""
    started = time.perf_counter()
    batch = np.array([f"d{d}" for d in delivery])
    rows = pd.DataFrame({"image_id": [f"i{i}" for i in image], "vendor": vendor, "batch": batch,
                         "label": np.array(classes)[given]})
    result, issues = run_audit(rows, probs, embeddings, classes, n_boot=bootstrap, seed=seed)
    # delivery d1 on the 1st of the month, d2 on the 8th, ...: d5 is each vendor's newest
    delivered_at = {name: f"2026-01-{1 + 7 * (int(name.rsplit('/d', 1)[1]) - 1):02d}T00:00:00+00:00"
                    for name in result.deliveries.names}
    tested = worsening(result.deliveries, delivered_at)
    wrong = given != true
    frame = pd.DataFrame({"vendor": vendor, "delivery": batch, "wrong": wrong})
    per_delivery = frame.groupby(["vendor", "delivery"])["wrong"].mean()
    per_vendor = frame.groupby("vendor")["wrong"].mean()
    newest = f"d{DELIVERIES}"
    true_difference = {v: float(per_delivery[v][newest] - frame[(frame.vendor == v) & (frame.delivery != newest)]
                                ["wrong"].mean()) for v in result.vendors}
    vendor_index = rows["vendor"].map({v: i for i, v in enumerate(result.vendors)}).to_numpy(np.int64)
    card = rate_table(result.vendors, vendor_index, issues["verdict"].to_numpy(), result.rates)
    deliveries = delivery_table(result.deliveries, issues["verdict"].to_numpy(),
                                dict(zip(result.vendors, result.rates.upper_only)), result.heldout_accuracy,
                                len(classes), delivered_at)
    by_delivery = issues.assign(vendor=issues["vendor"] + "/" + issues["batch"])
    verdicts = []
    for limit in LIMITS:
        limits = vendor_limits(result.vendors, limit, {})
        judged = pd.concat([card, contract_verdicts(card, limits, issues, [])], axis=1)
        verdicts.append(pd.DataFrame({"level": "vendor", "name": judged["vendor"], "limit": limit,
                                      "true_rate": judged["vendor"].map(per_vendor),
                                      "verdict": judged["contract_verdict"],
                                      "checks_to_decide": judged["checks_to_decide"]}))
        judged = with_delivery_contract(deliveries, limits, by_delivery, [])
        verdicts.append(pd.DataFrame({
            "level": "delivery", "name": judged["vendor"] + "/" + judged["delivery"], "limit": limit,
            "true_rate": [per_delivery[v][d] for v, d in zip(judged["vendor"], judged["delivery"])],
            "verdict": judged["contract_verdict"], "checks_to_decide": judged["checks_to_decide"]}))
    return DriftSeed(dataset, seed, tested, true_difference, pd.concat(verdicts, ignore_index=True),
                     time.perf_counter() - started)


def _outputs(scenario: Scenario, images: np.ndarray, given: np.ndarray, n_classes: int, config: BenchConfig):
    """The classifier's out-of-fold probabilities and embeddings, trained once on ``given`` (cached)."""
    probs, embeddings, _ = _model_outputs(scenario, 0, SimpleNamespace(images=images, given=given), n_classes, config)
    return probs, embeddings


def run_simulated(seeds: int, config: BenchConfig, processes: int = 1) -> list[DriftSeed]:
    """The Fashion-MNIST homes, seeds 0 .. seeds-1, ``processes`` audits at a time."""
    data = load_dataset(SIMULATED.dataset)
    n_images = len(SIMULATED.vendors) * DELIVERIES * PER_DELIVERY
    pool = np.random.default_rng(12345).permutation(len(data.labels))[:n_images]
    labels, n_classes = data.labels[pool], len(data.classes)
    order, _, _, given, _ = _simulated_home(pool, labels, n_classes, 0)
    training_given = np.empty_like(given)
    training_given[order] = given  # back in pool order: the training set is the pool
    log.info("drift, simulated: training on %d images (once, cached)", n_images)
    probs, embeddings = _outputs(SIMULATED, data.images[pool], training_given, n_classes, config)
    homes = ((SIMULATED.dataset, seed, pool[order], vendor, delivery, given, true, probs[order], embeddings[order],
              data.classes, config.bootstrap)
             for seed, (order, vendor, delivery, given, true) in
             ((seed, _simulated_home(pool, labels, n_classes, seed)) for seed in range(seeds)))
    return _audit_seeds("simulated", homes, processes)


def run_photos(seeds: int, config: BenchConfig, processes: int = 1) -> list[DriftSeed]:
    """The real-annotator homes (the photos of $CIFAR10_NPZ with their CIFAR-10N labels), seeds 0 .. seeds-1,
    ``processes`` audits at a time."""
    data = load_dataset(PHOTOS.dataset)
    workers = load_cifar10_workers()
    per_vendor = DELIVERIES * PER_DELIVERY
    first = label_by_workers(data, workers, PHOTO_SOURCES, per_vendor, 0)
    training_given = np.empty(len(data.labels), np.int64)
    training_given[first.source] = first.given  # in dataset order
    log.info("drift, photos: training on %d photos (once, cached)", len(data.labels))
    probs, embeddings = _outputs(PHOTOS, data.images, training_given, len(data.classes), config)
    # each vendor's photos come in a random order: consecutive blocks are its deliveries
    delivery = np.tile(np.repeat(np.arange(1, DELIVERIES + 1), PER_DELIVERY), len(PHOTO_SOURCES))
    homes = ((PHOTOS.dataset, seed, sim.source, np.array(sim.vendors)[sim.vendor], delivery, sim.given, sim.true[:, 0],
              probs[sim.source], embeddings[sim.source], data.classes, config.bootstrap)
             for seed, sim in ((seed, label_by_workers(data, workers, PHOTO_SOURCES, per_vendor, seed))
                               for seed in range(seeds)))
    return _audit_seeds("photos", homes, processes)


def _audit_home(home: tuple) -> DriftSeed:
    return _audit(*home)


def _audit_seeds(label: str, homes, processes: int) -> list[DriftSeed]:
    """:func:`_audit` of each home (its arguments), ``processes`` at a time (the estimator's
    refits run on one core each), in seed order."""
    runs = []
    with ProcessPoolExecutor(processes) if processes > 1 else nullcontext() as pool:
        for run in (pool.map(_audit_home, homes) if pool else map(_audit_home, homes)):
            runs.append(run)
            log.info("drift, %s: seed %d audited in %.0f s", label, run.seed, run.seconds)
    return runs


def found_worse(run: DriftSeed, family: list[str]) -> dict[str, bool]:
    """Per vendor of ``family``: found worse with Holm's adjustment across the family."""
    tested = run.worsening.set_index("vendor").reindex(family)
    p = tested["p_value"].fillna(1.0).to_numpy()  # a vendor not tested is not found worse
    return dict(zip(family, holm(p) < LEVEL))


def summarize(simulated: list[DriftSeed], photos: list[DriftSeed]) -> dict:
    """The Drift section's figures: caught and false-alarm shares, contract verdicts against the truth."""
    steady = list(STEADY)
    caught = {}
    for name in WORSENING:
        hits = [found_worse(run, steady + [name])[name] for run in simulated]
        measured = [float(run.worsening.set_index("vendor").loc[name, "difference"]) for run in simulated]
        truth = [run.true_difference[name] for run in simulated]
        caught[name] = {"seeds": len(hits), "caught": float(np.mean(hits)), "difference": float(np.mean(measured)),
                        "true_difference": float(np.mean(truth))}
    false_alarms = {}
    for label, runs, family in (("simulated", simulated, steady), ("real annotators", photos, list(PHOTO_SOURCES))):
        if runs:
            alarms = [any(found_worse(run, family).values()) for run in runs]
            false_alarms[label] = {"seeds": len(alarms), "family": family, "false_worse": float(np.mean(alarms))}
    verdicts = []
    for label, runs in (("simulated", simulated), ("real annotators", photos)):
        if not runs:
            continue
        cells = pd.concat([run.verdicts for run in runs], ignore_index=True)
        for (level, limit), group in cells.groupby(["level", "limit"]):
            contradicted = ((group["verdict"] == WITHIN) & (group["true_rate"] > limit)) | \
                ((group["verdict"] == BREACH) & (group["true_rate"] < limit))
            undecided = group["verdict"] == UNDECIDED
            verdicts.append({"data": label, "level": level, "limit": limit, "cells": len(group),
                             "within": float((group["verdict"] == WITHIN).mean()),
                             "breach": float((group["verdict"] == BREACH).mean()),
                             "undecided": float(undecided.mean()), "contradicted": float(contradicted.mean()),
                             "checks_to_decide": float(group.loc[undecided, "checks_to_decide"].median())
                             if undecided.any() else float("nan")})
    return {"caught": caught, "false_alarms": false_alarms, "verdicts": verdicts,
            "seconds": sum(run.seconds for run in simulated + photos)}


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


def format_drift(summary: dict) -> str:
    """Markdown tables of :func:`summarize`, each with its target."""
    sections = []
    if summary["caught"]:
        lines = ["### A worsening vendor caught (simulated, Fashion-MNIST)", "",
                 f"A vendor at {BEFORE_RATE:.0%} for {DELIVERIES - 1} deliveries of {PER_DELIVERY:,} images, then "
                 "one delivery at a higher rate; tested beside the four steady vendors (Holm over five).", "",
                 "| fifth delivery | seeds | caught | target | measured difference (mean) | true difference (mean) |",
                 "|---|---:|---:|---|---:|---:|"]
        for name, row in summary["caught"].items():
            target = 0.80 if WORSENING[name] < 0.15 else 0.95
            met = "met" if row["caught"] >= target else "**not met**"
            lines.append(f"| {WORSENING[name]:.0%} | {row['seeds']} | {_pct(row['caught'])} | >= {target:.0%} ({met}) "
                         f"| {100 * row['difference']:+.1f} points | {100 * row['true_difference']:+.1f} points |")
        sections.append(lines)
    lines = ["### No change: false alarms (family-wise over the vendors)", "",
             "| data | vendors | seeds | a vendor found worse | target |", "|---|---|---:|---:|---|"]
    for label, row in summary["false_alarms"].items():
        met = "met" if row["false_worse"] <= 0.05 else "**not met**"
        lines.append(f"| {label} | {', '.join(row['family'])} | {row['seeds']} | {_pct(row['false_worse'])} | "
                     f"<= 5% ({met}) |")
    sections.append(lines)
    lines = ["### Contract verdicts against the truth", "",
             "A `within` the true rate contradicts: the true rate is above the limit; a `breach`: below it.", "",
             "| data | level | limit | cells | within | breach | undecided | contradicted | target | "
             "checks to decide (median, undecided) |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for row in summary["verdicts"]:
        met = "met" if row["contradicted"] <= 0.05 else "**not met**"
        checks = "" if np.isnan(row["checks_to_decide"]) else f"{row['checks_to_decide']:.0f}"
        lines.append(f"| {row['data']} | {row['level']} | {row['limit']:.0%} | {row['cells']} | {_pct(row['within'])} "
                     f"| {_pct(row['breach'])} | {_pct(row['undecided'])} | {100 * row['contradicted']:.1f}% | "
                     f"<= 5% ({met}) | {checks} |")
    sections.append(lines)
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"
