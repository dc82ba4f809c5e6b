"""Vendor rates over time: each audit's scorecard kept across audits (``history/scorecards.parquet`` in
the home), and the trend plots the report draws from it and from the per-delivery rates."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd

from ml.files import atomic_write_bytes
from ml.plots import figure_png, pyplot
from ml.scorecard import RATED

# one row per vendor and audit: what a buyer compares across nights
HISTORY_COLUMNS = ["audited_at", "dataset_version", "model_version", "checks_version", "vendor", "n_images",
                   "error_rate", "error_rate_low", "error_rate_high", "basis", "status", "contract_limit",
                   "contract_verdict", "contract_action"]
# an audit is the same audit when these are: a re-run of it replaces its rows instead of adding a night
AUDIT_KEY = ["dataset_version", "model_version", "checks_version"]
_NUMBERS = ["n_images", "error_rate", "error_rate_low", "error_rate_high", "contract_limit"]
_TEXT = [c for c in HISTORY_COLUMNS if c not in _NUMBERS]


def read_history(path: Path) -> pd.DataFrame:
    """The history table (HISTORY_COLUMNS, oldest audit first); empty where no audit has written one."""
    if not path.is_file():
        return _typed(pd.DataFrame(columns=HISTORY_COLUMNS))
    frame = pd.read_parquet(path)
    missing = [c for c in HISTORY_COLUMNS if c not in frame]
    if missing:
        raise ValueError(f"{path}: history table lacks column(s) {', '.join(missing)}")
    return _typed(frame[HISTORY_COLUMNS])


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for column in _TEXT:
        frame[column] = frame[column].fillna("").astype(str)
    for column in _NUMBERS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame


def with_audit(history: pd.DataFrame, scorecard: pd.DataFrame, audited_at: str) -> pd.DataFrame:
    """``history`` with ``scorecard``'s vendors as the audit of ``audited_at`` (ISO time, UTC).

    The scorecard's own ``dataset_version``, ``model_version`` and ``checks_version`` identify the
    audit: an audit of the same three (a re-run, a settings change) replaces the rows it wrote before,
    so re-running is idempotent and each night that changed something adds one point per vendor.
    Columns the scorecard lacks (a scorecard without a contract) are left empty.
    """
    rows = scorecard.reindex(columns=HISTORY_COLUMNS).assign(audited_at=audited_at)
    rows = _typed(rows)
    if len(rows):
        key = tuple(rows.iloc[0][AUDIT_KEY])
        same = (history[AUDIT_KEY] == pd.Series(key, index=AUDIT_KEY)).all(axis=1)
        history = history[~same]
    combined = pd.concat([history, rows], ignore_index=True) if len(history) else rows
    return combined.sort_values(["audited_at", "vendor"], kind="stable").reset_index(drop=True)


def write_history(path: Path, history: pd.DataFrame) -> None:
    """Write the history table atomically (Parquet)."""
    buffer = io.BytesIO()
    _typed(history[HISTORY_COLUMNS]).to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def _panels(vendors: list[str]):
    plt = pyplot()
    columns = min(len(vendors), 3)
    rows = -(-len(vendors) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(vendors):]:
        ax.set_visible(False)
    return fig, list(axes.flat[:len(vendors)])


def _finish(fig, axes, frame: pd.DataFrame, title: str) -> bytes:
    """Every panel on one scale, from 0 to above the highest interval end and contract limit."""
    ends = [pd.to_numeric(frame.get(c, pd.Series(dtype=float)), errors="coerce") for c in
            ("error_rate_high", "contract_limit")]
    top = max([float(end.max()) for end in ends if end.notna().any()] + [0.01])
    for ax in axes:
        ax.set_ylim(0, 100 * top * 1.12)
    return figure_png(fig, title)


def _rate_with_interval(ax, x, frame: pd.DataFrame, colour: str) -> None:
    rate = 100 * frame["error_rate"].to_numpy(float)
    low = 100 * frame["error_rate_low"].to_numpy(float)
    high = 100 * frame["error_rate_high"].to_numpy(float)
    ax.errorbar(x, rate, yerr=[rate - low, high - rate], fmt="o", color=colour, ecolor=colour, capsize=3,
                markersize=4)


def _limit_line(ax, frame: pd.DataFrame) -> None:
    limits = pd.to_numeric(frame.get("contract_limit", pd.Series(dtype=float)), errors="coerce").dropna()
    if len(limits):
        ax.axhline(100 * float(limits.iloc[-1]), color="#b2182b", linestyle="--", linewidth=1, label="contract limit")
        ax.legend(loc="upper left", fontsize=7, frameon=False)


def delivery_trend_plot(deliveries: pd.DataFrame) -> bytes:
    """PNG: each vendor's error rate with its 95% interval per delivery, in delivery order, one panel per
    vendor, the contract's limit dashed where set. ``deliveries``: reports/deliveries.csv's rows
    (vendor, delivery, delivered_at, error_rate, error_rate_low, error_rate_high, status
    [, contract_limit]); deliveries too small to rate are named but not drawn."""
    vendors = sorted(deliveries["vendor"].astype(str).unique())
    fig, axes = _panels(vendors)
    for ax, vendor in zip(axes, vendors):
        mine = deliveries[deliveries["vendor"].astype(str) == vendor].sort_values(["delivered_at", "delivery"])
        x = np.arange(len(mine))
        rated = (mine["status"] == RATED).to_numpy()
        _rate_with_interval(ax, x[rated], mine[rated], "#2166ac")
        _limit_line(ax, mine)
        ax.set_xticks(x, [f"{d}" + ("" if r else "\n(too few)") for d, r in zip(mine["delivery"], rated)],
                      fontsize=7, rotation=30 if len(mine) > 4 else 0)
        ax.set_title(vendor, fontsize=10)
        ax.set_ylabel("error rate (%)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    return _finish(fig, axes, deliveries[deliveries["status"] == RATED],
                   "Error rate per delivery (95% interval), oldest first")


def audit_trend_plot(history: pd.DataFrame) -> bytes:
    """PNG: each vendor's error rate with its 95% interval in every audit of ``history`` (HISTORY_COLUMNS),
    one panel per vendor, by audit time, the contract's limit dashed where set."""
    vendors = sorted(history["vendor"].unique())
    fig, axes = _panels(vendors)
    times = pd.to_datetime(history["audited_at"], utc=True, errors="coerce")
    for ax, vendor in zip(axes, vendors):
        mine = (history.assign(_time=times)[(history["vendor"] == vendor) & (history["status"] == RATED)]
                .sort_values("_time"))
        x = mine["_time"].dt.tz_localize(None).to_numpy()
        _rate_with_interval(ax, x, mine, "#1b7837")
        if len(mine) > 1:
            ax.fill_between(x, 100 * mine["error_rate_low"], 100 * mine["error_rate_high"], color="#1b7837",
                            alpha=0.12, linewidth=0)
        _limit_line(ax, mine)
        ax.set_title(vendor, fontsize=10)
        ax.set_ylabel("error rate (%)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.tick_params(axis="x", labelsize=7, rotation=30)
    return _finish(fig, axes, history[history["status"] == RATED], "Error rate in each audit (95% interval)")
