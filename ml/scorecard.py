"""The vendor scorecard and pairwise vendor comparisons."""

from __future__ import annotations

import numpy as np
import pandas as pd

from ml.estimate import VendorRates

SCORECARD_COLUMNS = ["vendor", "n_images", "n_flagged", "n_ambiguous", "error_rate", "error_rate_low",
                     "error_rate_high", "rank"]


def build_scorecard(vendors: list[str], vendor: np.ndarray, verdict: np.ndarray, rates: VendorRates) -> pd.DataFrame:
    """One row per vendor (SCORECARD_COLUMNS, then ``ambiguous_rate``); ``vendor`` (N,) indexes
    ``vendors``, ``verdict`` (N,) str. ``error_rate`` counts clear errors only."""
    n_vendors = len(vendors)
    card = pd.DataFrame({
        "vendor": vendors,
        "n_images": np.bincount(vendor, minlength=n_vendors),
        "n_flagged": np.bincount(vendor, weights=verdict == "error", minlength=n_vendors).astype(int),
        "n_ambiguous": np.bincount(vendor, weights=verdict == "ambiguous", minlength=n_vendors).astype(int),
        "error_rate": rates.rate.round(4),
        "error_rate_low": rates.low.round(4),
        "error_rate_high": rates.high.round(4),
    })
    card["rank"] = card["error_rate"].rank(method="min").astype(int)
    card["ambiguous_rate"] = (card["n_ambiguous"] / card["n_images"].clip(lower=1)).round(4)
    return card.sort_values(["rank", "vendor"]).reset_index(drop=True)[SCORECARD_COLUMNS + ["ambiguous_rate"]]


def compare_vendors(vendors: list[str], rates: VendorRates, alpha: float = 0.05) -> pd.DataFrame:
    """Every pair (a, b): ``difference`` = rate(a) - rate(b) with a bootstrap 95% interval, a two-sided
    bootstrap p-value, and a plain-words ``conclusion``."""
    rows = []
    for a in range(len(vendors)):
        for b in range(a + 1, len(vendors)):
            point = float(rates.rate[a] - rates.rate[b])
            diff = rates.bootstrap[:, a] - rates.bootstrap[:, b]
            diff = diff + (point - diff.mean())  # centred on the point estimate, as the rate intervals
            low, high = np.percentile(diff, [100 * alpha / 2, 100 * (1 - alpha / 2)])
            # two-sided percentile p-value: consistent with the interval (p < alpha iff it excludes 0)
            tail = min(np.sum(diff <= 0), np.sum(diff >= 0))
            p_value = float(min(1.0, 2 * (tail + 1) / (len(diff) + 1)))
            if p_value < alpha:
                better, worse = (vendors[a], vendors[b]) if point < 0 else (vendors[b], vendors[a])
                conclusion = f"{better} has fewer errors than {worse}"
            else:
                conclusion = "not distinguishable with this data"
            rows.append({"vendor_a": vendors[a], "vendor_b": vendors[b], "difference": round(point, 4),
                         "difference_low": round(float(low), 4), "difference_high": round(float(high), 4),
                         "p_value": round(p_value, 4), "conclusion": conclusion})
    return pd.DataFrame(rows, columns=["vendor_a", "vendor_b", "difference", "difference_low", "difference_high",
                                       "p_value", "conclusion"])
