"""Vendor rates across audits: the history table (ml.history) and the report's trend plots. The whole
loop (two audits of a real home, DVC-versioned) is in test_end_to_end.py."""

from pathlib import Path

import pandas as pd
import pytest

from ml.history import HISTORY_COLUMNS, audit_trend_plot, delivery_trend_plot, read_history, with_audit, write_history
from ml.report import _over_time


def _card(version: str, rates: dict[str, float], checks: str = "", limit: float | None = 0.05) -> pd.DataFrame:
    return pd.DataFrame({"vendor": list(rates), "n_images": 1000, "error_rate": list(rates.values()),
                         "error_rate_low": [r - 0.01 for r in rates.values()],
                         "error_rate_high": [r + 0.01 for r in rates.values()], "basis": "model only",
                         "status": "rated", "dataset_version": version, "model_version": "3",
                         "checks_version": checks, "contract_limit": limit, "contract_verdict": "within",
                         "contract_action": "pay", "rank": range(1, len(rates) + 1)})


def test_each_audit_adds_its_vendors_and_a_rerun_of_the_same_audit_replaces_them(tmp_path):
    path = tmp_path / "history" / "scorecards.parquet"
    history = read_history(path)
    assert list(history.columns) == HISTORY_COLUMNS and history.empty

    history = with_audit(history, _card("v1", {"a": 0.02, "b": 0.10}), "2026-01-01T02:00:00+00:00")
    write_history(path, history)
    history = with_audit(read_history(path), _card("v2", {"a": 0.03, "b": 0.12, "c": 0.2}),
                         "2026-01-02T02:00:00+00:00")
    write_history(path, history)
    # the same data, model and checks again (a re-run, a changed contract): its rows are replaced
    rerun = _card("v2", {"a": 0.03, "b": 0.12, "c": 0.2}, limit=0.10)
    history = with_audit(read_history(path), rerun, "2026-01-02T05:00:00+00:00")
    write_history(path, history)

    kept = read_history(path)
    assert kept["audited_at"].tolist() == ["2026-01-01T02:00:00+00:00"] * 2 + ["2026-01-02T05:00:00+00:00"] * 3
    assert kept["vendor"].tolist() == ["a", "b", "a", "b", "c"]
    assert kept["error_rate"].tolist() == [0.02, 0.10, 0.03, 0.12, 0.2]
    assert kept["contract_limit"].tolist() == [0.05, 0.05, 0.10, 0.10, 0.10]
    # new hand checks make a new audit of the same data
    checked = with_audit(kept, _card("v2", {"a": 0.03, "b": 0.12, "c": 0.2}, checks="abc"), "2026-01-03T02:00:00+00:00")
    assert checked["audited_at"].nunique() == 3


def test_a_scorecard_without_contract_columns_is_kept_with_them_empty(tmp_path):
    card = _card("v1", {"a": 0.02}).drop(columns=["contract_limit", "contract_verdict", "contract_action"])
    path = tmp_path / "scorecards.parquet"
    write_history(path, with_audit(read_history(path), card, "2026-01-01T00:00:00+00:00"))
    kept = read_history(path)
    assert kept["contract_verdict"].tolist() == [""] and kept["contract_limit"].isna().all()


def test_a_history_file_without_its_columns_is_a_clear_error(tmp_path):
    path = tmp_path / "scorecards.parquet"
    pd.DataFrame({"vendor": ["a"]}).to_parquet(path)
    with pytest.raises(ValueError, match=r"scorecards.parquet: history table lacks column\(s\) audited_at"):
        read_history(path)


def _deliveries(per_vendor: int) -> pd.DataFrame:
    rows = [{"vendor": v, "delivery": f"batch-{i:03d}", "delivered_at": f"2026-01-{i:02d}", "n_images": 1000,
             "error_rate": 0.02 * (i + 1), "error_rate_low": 0.01, "error_rate_high": 0.03 * (i + 2),
             "status": "rated", "contract_limit": 0.08} for v in ("a", "b") for i in range(1, per_vendor + 1)]
    return pd.DataFrame(rows)


def test_the_report_plots_rates_over_deliveries_and_from_the_second_audit_over_audits():
    one = with_audit(read_history(Path("/nonexistent")), _card("v1", {"a": 0.02, "b": 0.1}),
                     "2026-01-01T00:00:00+00:00")
    # one delivery per vendor, one audit: nothing to draw over time
    assert _over_time(_deliveries(1), one, {}) == []

    files = {}
    blocks = _over_time(_deliveries(3), one, files)
    assert list(files) == ["plots/trend-deliveries.png"]
    assert "from the second audit on" in str(blocks[-1])

    two = with_audit(one, _card("v2", {"a": 0.03, "b": 0.12}), "2026-01-08T00:00:00+00:00")
    files = {}
    blocks = _over_time(_deliveries(1), two, files)
    assert list(files) == ["plots/trend-deliveries.png", "plots/trend-audits.png"]
    assert "2 audits" in str(blocks)
    assert all(png.startswith(b"\x89PNG") for png in files.values())


def test_trend_plots_render_with_a_delivery_too_small_to_rate():
    deliveries = _deliveries(3)
    deliveries.loc[0, "status"] = "too few images to rate"
    assert delivery_trend_plot(deliveries).startswith(b"\x89PNG")
    history = with_audit(with_audit(read_history(Path("/nonexistent")), _card("v1", {"a": 0.02}), "2026-01-01"),
                         _card("v2", {"a": 0.03}), "2026-01-02")
    assert audit_trend_plot(history).startswith(b"\x89PNG")
