"""Benchmark of hand checks: the combined estimate (model + checks drawn by the planner) against
uniform checks alone with Wilson intervals, a checker simulated from the truth, on the benchmark's
cached model outputs (bench/accuracy.py)."""

from __future__ import annotations

import logging

import numpy as np
from sklearn.isotonic import IsotonicRegression

from bench.accuracy import SCENARIOS, BenchConfig, _model_outputs
from ml.check_sampling import UNIFORM_SHARE, checked_error_rates, draw_plan, inclusion_probabilities
from ml.datasets import load_dataset
from ml.estimate import fit_noise_model, vendor_error_rates, wilson_interval
from ml.issues import counted_as_error
from ml.simulate import copy_confident_mistakes

log = logging.getLogger(__name__)
BUDGETS = (25, 50, 100, 200)
SEARCH = (25, 50, 75, 100, 150, 200, 300, 400, 600, 800, 1000, 1500, 2000)  # budgets tried for +-2 points
TARGET_HALFWIDTH = 0.02


def uniform_checks_for_halfwidth(rate: float, per_vendor: int, target: float = TARGET_HALFWIDTH) -> int:
    """Uniform checks whose Wilson half-width at the true ``rate`` is at most ``target`` (expected count)."""
    for n in range(10, per_vendor + 1):
        low, high = wilson_interval(np.array(rate * n), np.array(n))
        if (high - low) / 2 <= target:
            return n
    return per_vendor


def taught_by_other_vendors(model_error: np.ndarray, drawn: np.ndarray, wrong: np.ndarray, inclusion: np.ndarray,
                            vendor: np.ndarray, n_vendors: int) -> np.ndarray:
    """Each vendor's model-only rate re-corrected with the visibility the *other* vendors' checks measured
    (V,): ``(raw - f_c) / (s_c - f_c)``, with ``raw`` the vendor's mean ``model_error`` (N,) and ``s_c``,
    ``f_c`` the Horvitz-Thompson means of ``model_error`` over the other vendors' checked wrong and
    checked correct labels. This is what "checks teach the model-only path" would give a vendor with no
    checks of its own; it holds only where vendors' errors are equally visible (docs/method.md)."""
    weight = np.where(drawn, 1 / np.where(drawn, inclusion, 1), 0.0)
    raw = np.bincount(vendor, weights=model_error, minlength=n_vendors) / np.bincount(vendor, minlength=n_vendors)
    taught = np.full(n_vendors, np.nan)
    for v in range(n_vendors):
        others = weight * (vendor != v)
        on_wrong, on_right = others * wrong, others * ~wrong
        if on_wrong.sum() and on_right.sum():
            detected = (on_wrong * model_error).sum() / on_wrong.sum()
            false_alarm = (on_right * model_error).sum() / on_right.sum()
            taught[v] = np.clip((raw[v] - false_alarm) / max(detected - false_alarm, 1e-6), 0, 1)
    return taught


def calibrated_on_truth(model_error: np.ndarray, wrong: np.ndarray, vendor: np.ndarray) -> np.ndarray:
    """(N,) each vendor's ``model_error`` (N,) mapped to its share of wrong labels (N,) among all of that
    vendor's images at that level (an isotonic fit on the truth): the best control any increasing function
    of the model's error probability could give the combined estimate. An oracle, for the benchmark only:
    it shows how much of the estimate's error a better fit of the control could remove with this model."""
    calibrated = np.empty(len(model_error))
    for v in np.unique(vendor):
        members = vendor == v
        fit = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip")
        calibrated[members] = fit.fit_transform(model_error[members], wrong[members].astype(float))
    return calibrated


def run_checks_seed(key: str, seed: int, config: BenchConfig, budgets=BUDGETS, draws: int = 20,
                    uniform_share: float = UNIFORM_SHARE) -> dict:
    """Per budget, ``draws`` independent plans per vendor, combined estimate and uniform Wilson alone;
    also the same with a useless model (random probabilities of error). ``uniform_share``: the plans'
    evenly spread share (the product's by default; another value measures the design)."""
    scenario = SCENARIOS[key]
    data = load_dataset(scenario.dataset)
    sim = scenario.simulate(data, seed)
    probs, _, _ = _model_outputs(scenario, seed, sim, len(data.classes), config)
    sim = copy_confident_mistakes(sim, probs, scenario.copies) if scenario.copies else sim
    model = fit_noise_model(probs, sim.given, sim.vendor)
    p_error = model.p_error(sim.given)
    f = p_error * counted_as_error()(model.clean_prior, sim.given, p_error)  # ambiguous labels are not billed
    wrong = sim.wrong
    n_vendors = len(sim.vendors)
    truth = np.array([wrong[sim.vendor == v].mean() for v in range(n_vendors)])
    keys = np.arange(len(f)).astype(str)
    useless = np.random.default_rng(seed).random(len(f))
    oracle = calibrated_on_truth(f, wrong, sim.vendor)
    rng = np.random.default_rng([seed, 7])
    model_only = vendor_error_rates(probs, sim.given, sim.vendor, model, counted_as_error(), n_boot=1).rate
    figures = {"truth": truth, "vendors": list(sim.vendors), "model_only": model_only}
    n_per_vendor = np.bincount(sim.vendor)
    for budget in sorted(set(budgets) | set(SEARCH)):
        combined, useless_rates, uniform, taught, oracle_rates = [], [], [], [], []
        plans = [(model_error, inclusion_probabilities(model_error, sim.vendor, np.full(n_vendors, budget), uniform_share), out)
                 for model_error, out in ((f, combined), (useless, useless_rates))]
        n = np.minimum(budget, n_per_vendor)
        for draw in range(draws):
            for model_error, pi, out in plans:
                drawn = draw_plan(pi, keys, 1000 * budget + draw)
                out.append(checked_error_rates(model_error, drawn, wrong, pi, sim.vendor, n_vendors))
                if out is combined:
                    taught.append(taught_by_other_vendors(f, drawn, wrong, pi, sim.vendor, n_vendors))
                    # the same checks, the control calibrated on the truth
                    oracle_rates.append(checked_error_rates(oracle, drawn, wrong, pi, sim.vendor, n_vendors).rate)
            errors = np.array([wrong[rng.choice(np.flatnonzero(sim.vendor == v), n[v], replace=False)].sum()
                               for v in range(n_vendors)])
            uniform.append((errors / n, *wilson_interval(errors, n)))
        figures[budget] = {
            "rate": np.array([r.rate for r in combined]), "low": np.array([r.low for r in combined]),
            "high": np.array([r.high for r in combined]),
            "useless_width": np.array([r.high - r.low for r in useless_rates]),
            "taught": np.array(taught), "oracle_rate": np.array(oracle_rates),
            "uniform_rate": np.array([u[0] for u in uniform]), "uniform_low": np.array([u[1] for u in uniform]),
            "uniform_high": np.array([u[2] for u in uniform]),
        }
    return figures


def summarize_checks(key: str, runs: list[dict], budgets=BUDGETS) -> dict:
    """Coverage, mean width and MAE per budget (over vendors, seeds and draws), and per vendor the
    smallest budget whose mean half-width is at most 2 points (planner, and uniform Wilson)."""
    vendors = runs[0]["vendors"]
    truth = np.stack([r["truth"] for r in runs])  # (seeds, V)
    rows = []
    for budget in budgets:
        def stacked(name):
            return np.stack([r[budget][name] for r in runs])  # (seeds, draws, V)
        t = truth[:, None, :]
        rate, low, high = stacked("rate"), stacked("low"), stacked("high")
        u_rate, u_low, u_high = stacked("uniform_rate"), stacked("uniform_low"), stacked("uniform_high")
        perfect = t[..., :] == 0
        rows.append({
            "budget": budget,
            "coverage": float(((low <= t) & (t <= high)).mean()),
            "coverage_min_vendor": float(((low <= t) & (t <= high)).mean(axis=(0, 1)).min()),
            "width": float((high - low).mean()), "mae": float(np.abs(rate - t).mean()),
            "uniform_coverage": float(((u_low <= t) & (t <= u_high)).mean()),
            "uniform_width": float((u_high - u_low).mean()), "uniform_mae": float(np.abs(u_rate - t).mean()),
            "useless_ratio": float(stacked("useless_width").mean() / (u_high - u_low).mean()),
            "zero_reached": float((low[np.broadcast_to(perfect, low.shape)] == 0).mean()) if perfect.any() else np.nan,
            "model_only_mae": float(np.abs(np.stack([r["model_only"] for r in runs]) - truth).mean()),
            "taught_mae": float(np.nanmean(np.abs(stacked("taught") - t))),
            "oracle_mae": float(np.abs(stacked("oracle_rate") - t).mean()),
        })
    needed, uniform_needed = [], []
    # per budget (V,): what each vendor's combined estimate reads on average over seeds and draws
    mean_rate = {b: np.mean([r[b]["rate"] for r in runs], axis=(0, 1)) for b in budgets}
    for v in range(len(vendors)):
        halfwidths = {b: float(np.mean([(r[b]["high"][:, v] - r[b]["low"][:, v]) / 2 for r in runs])) for b in SEARCH}
        needed.append(next((b for b in SEARCH if halfwidths[b] <= TARGET_HALFWIDTH), None))
        uniform_needed.append(uniform_checks_for_halfwidth(float(truth[:, v].mean()), SEARCH[-1]))
    return {"key": key, "title": SCENARIOS[key].title, "seeds": len(runs), "vendors": vendors,
            "truth": truth.mean(axis=0), "rows": rows, "needed": needed, "uniform_needed": uniform_needed,
            "budgets": list(budgets), "mean_rate": mean_rate}


def format_checks_table(summaries: list[dict]) -> str:
    """Markdown: per scenario and budget, the combined estimate beside its oracle-calibrated twin
    (:func:`calibrated_on_truth`) and uniform checks with Wilson intervals; then per vendor the mean
    estimate and the checks it needs for +-2 points."""
    lines = ["| scenario | checks per vendor | 95% coverage (worst vendor) | mean width, points | MAE, points | "
             "MAE with the control calibrated on the truth (oracle) | uniform + Wilson: coverage, width, MAE | "
             "useless model: width / uniform width | 0% vendor reaches 0 | "
             "model only: MAE, and re-corrected by the other vendors' checks |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        for row in s["rows"]:
            zero = "n/a" if np.isnan(row["zero_reached"]) else f"{100 * row['zero_reached']:.0f}%"
            lines.append(
                f"| {s['key']} {s['title']} | {row['budget']} | {100 * row['coverage']:.1f}% "
                f"({100 * row['coverage_min_vendor']:.1f}%) | {100 * row['width']:.1f} | {100 * row['mae']:.2f} | "
                f"{100 * row['oracle_mae']:.2f} | "
                f"{100 * row['uniform_coverage']:.1f}%, {100 * row['uniform_width']:.1f}, "
                f"{100 * row['uniform_mae']:.2f} | {row['useless_ratio']:.2f} | {zero} | "
                f"{100 * row['model_only_mae']:.2f} → {100 * row['taught_mae']:.2f} |")
    lines += ["", "Per vendor: the combined estimate's mean over seeds and draws at each budget, and the checks for a "
              "95% half-width of at most 2 points (planner searched over " + ", ".join(map(str, SEARCH)) +
              "; uniform: Wilson at the true rate):", "",
              "| scenario | vendor (true %) | mean estimate, % (checks per vendor) | "
              "checks for +-2 points: planner + model | uniform + Wilson |", "|---|---|---|---|---|"]
    for s in summaries:
        for v, name in enumerate(s["vendors"]):
            planner = s["needed"][v] if s["needed"][v] is not None else f"> {SEARCH[-1]}"
            estimates = " / ".join(f"{100 * s['mean_rate'][b][v]:.1f} ({b})" for b in s["budgets"])
            lines.append(f"| {s['key']} | {name} ({100 * s['truth'][v]:.1f}) | {estimates} | {planner} "
                         f"| {s['uniform_needed'][v]} |")
    return "\n".join(lines) + "\n"


def run_checks_benchmark(keys: list[str], config: BenchConfig, budgets=BUDGETS, draws: int = 20,
                         uniform_share: float = UNIFORM_SHARE) -> list[dict]:
    summaries = []
    for key in keys:
        runs = []
        for seed in range(config.seeds):
            log.info("checks: scenario %s seed %d/%d", key, seed + 1, config.seeds)
            runs.append(run_checks_seed(key, seed, config, budgets, draws, uniform_share))
        summaries.append(summarize_checks(key, runs, budgets))
        log.info("checks: scenario %s done:\n%s", key, format_checks_table(summaries[-1:]))
    return summaries
