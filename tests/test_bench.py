"""The benchmark's bookkeeping on a real (small) run: figures in range, cache reused, tables formed."""

import numpy as np
import pytest

from bench.accuracy import (SCENARIOS, BenchConfig, Scenario, _ranking_metrics, format_late_table, format_tables,
                      run_late_seed, run_seed, summarize, summarize_late)
from bench.checks import (calibrated_on_truth, format_checks_table, run_checks_seed, summarize_checks,
                          taught_by_other_vendors, uniform_checks_for_halfwidth)
from ml.estimate import wilson_interval


def test_ranking_metrics():
    assert _ranking_metrics(np.array([0.01, 0.04, 0.3]), np.array([0.0, 0.05, 0.2])) == (1.0, [True, True, True])
    exact, pairs = _ranking_metrics(np.array([0.06, 0.04, 0.3]), np.array([0.0, 0.05, 0.2]))
    assert exact == 0.0 and pairs == [False, True, True]


def test_one_seed_of_the_digits_scenario(tmp_path):
    config = BenchConfig(seeds=1, folds=2, digits_epochs=6, bootstrap=10, cache=tmp_path)
    run = run_seed(SCENARIOS["E"], 0, config)
    np.testing.assert_allclose(run["truth"], [0 / 550, 28 / 550, 110 / 550])  # exactly round(rate * 550) wrong
    assert 0 <= run["auroc"] <= 1 and run["top1"] > 0.5 and run["top1"] == run["set_accuracy"]
    assert len(list(tmp_path.glob("E-s0-*.npz"))) == 1
    again = run_seed(SCENARIOS["E"], 0, config)  # from the cache: same outputs, same figures
    np.testing.assert_array_equal(again["estimate"], run["estimate"])
    table = format_tables([summarize(SCENARIOS["E"], [run])])
    assert "| E digits" in table and table.count("\n|") >= 6
    # hand checks on the same cached outputs
    checks = run_checks_seed("E", 0, config, budgets=(25, 100), draws=3)
    assert checks[100]["rate"].shape == (3, 3) and np.all(checks[100]["low"] <= checks[100]["high"])
    assert np.all(checks[100]["low"][:, 0] == 0)  # the perfect vendor's interval reaches 0
    assert checks[100]["taught"].shape == (3, 3) and checks["model_only"].shape == (3,)
    assert checks[100]["oracle_rate"].shape == (3, 3)
    summary = summarize_checks("E", [checks], budgets=(25, 100))
    assert [row["budget"] for row in summary["rows"]] == [25, 100]
    assert all(0 <= row["coverage"] <= 1 and row["width"] > 0 for row in summary["rows"])
    assert summary["rows"][1]["width"] < summary["rows"][0]["width"]  # more checks, narrower intervals
    table = format_checks_table([summary])
    assert "| E digits (8x8 upscaled), 3 x 550 | 100 |" in table
    mean_at_100 = 100 * checks[100]["rate"][:, 2].mean()  # one seed: the mean over its draws
    assert f"| E | c (20.0) | {100 * checks[25]['rate'][:, 2].mean():.1f} (25) / {mean_at_100:.1f} (100) |" in table


def test_control_calibrated_on_the_truth_is_each_vendors_error_share_at_each_level():
    """The oracle control of bench-checks: per vendor, the share of wrong labels at each level of the
    model's probability of error; a vendor whose errors are twice as frequent as the model says gets
    twice the model's figure, and each vendor's mean is its true error rate."""
    rng = np.random.default_rng(1)
    n = 40000
    vendor = np.repeat([0, 1], n)
    f = rng.uniform(0, 0.4, 2 * n)
    wrong = rng.random(2 * n) < np.where(vendor == 1, 2 * f, f)
    calibrated = calibrated_on_truth(f, wrong, vendor)
    for v in (0, 1):
        assert calibrated[vendor == v].mean() == pytest.approx(wrong[vendor == v].mean())
    middle = (f > 0.15) & (f < 0.25)
    np.testing.assert_allclose(calibrated[middle & (vendor == 0)].mean(), 0.2, atol=0.01)
    np.testing.assert_allclose(calibrated[middle & (vendor == 1)].mean(), 0.4, atol=0.015)


def test_visibility_taught_by_other_vendors_checks():
    """Re-correcting a vendor's mean probability of error with the visibility measured on the other
    vendors' checks recovers its rate where all vendors' errors are equally visible, and reads a vendor
    whose errors are harder to see low (why the product does not do it)."""
    rng = np.random.default_rng(0)
    n, rates = 20000, np.array([0.05, 0.1, 0.2])
    vendor = np.repeat(np.arange(3), n)
    wrong = rng.random(3 * n) < rates[vendor]
    visible = np.where(wrong, rng.beta(6, 3, 3 * n), rng.beta(1, 30, 3 * n))  # p_error: 0.67 on wrong labels
    everything = np.ones(3 * n, bool)
    taught = taught_by_other_vendors(visible, everything, wrong, np.ones(3 * n), vendor, 3)
    np.testing.assert_allclose(taught, rates, atol=0.01)
    hidden = np.where(wrong & (vendor == 0), rng.beta(3, 6, 3 * n), visible)  # vendor 0: 0.33 on its wrong labels
    taught = taught_by_other_vendors(hidden, everything, wrong, np.ones(3 * n), vendor, 3)
    assert taught[0] < 0.6 * rates[0]
    planned = rng.random(3 * n) < 0.05  # a 5% uniform sample of checks: weights 1/0.05
    taught = taught_by_other_vendors(visible, planned, wrong, np.full(3 * n, 0.05), vendor, 3)
    np.testing.assert_allclose(taught, rates, atol=0.02)


def test_wilson_intervals_and_uniform_checks_needed():
    low, high = wilson_interval(np.array([0, 5]), np.array([10, 100]))
    np.testing.assert_allclose(low, [0.0, 0.02154], atol=1e-4)
    np.testing.assert_allclose(high, [0.27753, 0.11175], atol=1e-4)
    # +-2 points at 95% with uniform checks alone: about 470 on a 5% vendor, 1,540 on a 20% vendor
    assert 460 <= uniform_checks_for_halfwidth(0.05, 2000) <= 480
    assert 1520 <= uniform_checks_for_halfwidth(0.20, 2000) <= 1560


def test_each_benchmark_replaces_only_its_own_section(tmp_path):
    from ml.report import write_section

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nHand-written introduction.\n")
    write_section(path, "bench", "## accuracy\n\nfirst")
    write_section(path, "bench-incremental", "## incremental\n\ntimings")
    write_section(path, "bench", "## accuracy\n\nsecond")
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nHand-written introduction.\n")
    assert "second" in text and "first" not in text and "timings" in text
    assert text.index("second") < text.index("timings")  # replaced in place, not moved
    assert text.count("<!-- bench:start -->") == 1 and text.count("<!-- bench-incremental:end -->") == 1


def test_late_deliveries_read_like_their_originals(tmp_path):
    """A byte copy landed after training gets its original's rate; the previous scoring (the mean of
    the fold models, which trained on those very images) read it lower."""
    scenario = Scenario("Ltest", "late digits", "digits", {"a": 0.0, "b": 0.1, "c": 0.3}, 200, late=60)
    config = BenchConfig(seeds=1, folds=2, digits_epochs=8, bootstrap=10, cache=tmp_path)
    run = run_late_seed(scenario, 0, config)
    for v in ("a", "b", "c"):
        copy = run["figures"][("now", v, "-copy")]
        assert abs(copy["difference"]) < 1e-9 and not copy["claimed"]
        assert run["figures"][("move", v)] < 1 / 3  # later deliveries move an original by under a third of its interval
    assert run["figures"][("before", "c", "-copy")]["difference"] < -0.05  # read back the labels it learned
    summary = summarize_late(scenario, [run])
    assert "| byte copy | now | 0.0 / 0.0 / 0.0 |" in format_late_table(summary)


def test_a_photo_scenario_trains_a_probe_on_cached_backbone_features(tmp_path, monkeypatch):
    """A photo scenario names its backbone and training mode; its features are cached by content."""
    from ml.datasets import load_digits_upscaled

    digits = load_digits_upscaled()
    photos = np.repeat(digits.images[:, :, :, None], 3, axis=3)  # colour photos of the digits
    npz = tmp_path / "photos.npz"
    np.savez(npz, images=photos, labels=digits.labels, classes=np.array(digits.classes))
    monkeypatch.setenv("CIFAR10_NPZ", str(npz))
    scenario = Scenario("Ptest", "digit photos; efficientnet_lite0 probe", "cifar10", {"a": 0.0, "b": 0.2}, 150,
                        backbone="efficientnet_lite0", training="probe")
    config = BenchConfig(seeds=1, folds=2, bootstrap=10, cache=tmp_path / "cache")
    run = run_seed(scenario, 0, config)
    assert run["top1"] > 0.6  # pretrained features separate the digits far above chance (0.1)
    assert len(list((tmp_path / "cache").glob("Ptest-s0-*-efficientnet_lite0-probe.npz"))) == 1
    assert any((tmp_path / "cache" / "features").rglob("*"))


def test_engine_benchmark_times_both_engines_on_the_same_photos():
    """bench-engines computes the same photos' features by the local engine and by a real local Ray
    cluster, and reports the times and the largest difference between them."""
    from bench.engines import format_engines, measure_engines

    photos = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    result = measure_engines(photos, "mobilenet_v3_small", "none", num_cpus=2)
    assert result["images"] == 48 and result["local_s"] > 0 and result["ray_pipeline_s"] > 0
    assert result["max_abs_difference"] < 1e-4  # the same backbone object: last bits only
    assert result["ray_over_local"] == pytest.approx((result["ray_start_s"] + result["ray_pipeline_s"])
                                                     / result["local_s"])
    table = format_engines([result], "vendor-audit bench-engines --sizes 48")
    assert "| 48 |" in table and "local 2-CPU Ray cluster" in table


def test_scale_benchmark_times_every_stage_on_a_synthetic_collection():
    """bench-scale's synthetic collection has the vendors' error rates and deliveries it says, and one
    size's measurement times every stage, in a process of its own, with a table and a log-log plot."""
    from bench.scale import (PER_DELIVERY, STAGES, VENDOR_RATES, format_scale, run_scale_benchmark, scale_plot,
                             synthetic_collection)

    rows, probs, embeddings, classes, wrong = synthetic_collection(40_000)
    assert probs.shape == (40_000, 10) and embeddings.shape == (40_000, 128) and embeddings.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    shares = rows.assign(wrong=wrong).groupby("vendor")["wrong"].mean().to_numpy()
    np.testing.assert_allclose(shares, VENDOR_RATES, atol=0.006)
    assert rows.groupby("vendor")["batch"].nunique().tolist() == [10_000 // PER_DELIVERY] * 4
    results = run_scale_benchmark([1000, 2000], n_boot=5)
    assert [r["n_images"] for r in results] == [1000, 2000]
    for r in results:
        assert set(r["seconds"]) == set(STAGES) and all(s > 0 for s in r["seconds"].values())
        assert max(r["peak_mb"].values()) > 50 and r["mae_points"] < 10
    table = format_scale(results, "vendor-audit bench-scale --sizes 1000,2000")
    assert "| 2,000 |" in table and "Log-log slope from 1,000 to 2,000 images" in table
    assert scale_plot(results).startswith(b"\x89PNG")
