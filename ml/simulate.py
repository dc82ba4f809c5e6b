"""Simulated vendor deliveries from a real dataset, with known wrong labels (the truth) kept aside."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ml.config import CONFIG_NAME, Settings, load_settings, write_settings
from ml.datasets import ImageSet
from ml.delivery import LABELS_FILE, NAME_RE, READY_MARKER, atomic_write_csv

TRUTH_FILE = "truth.csv"


def parse_vendor_rates(spec: str) -> dict[str, float]:
    """``"a=0.0,b=0.05"`` -> ``{"a": 0.0, "b": 0.05}`` with names and fractions validated."""
    rates = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not NAME_RE.match(name):
            raise ValueError(f"bad vendor spec {part!r}: expected name=rate with letters, digits, - or _")
        rate = float(value)
        if not 0 <= rate < 1:
            raise ValueError(f"bad vendor spec {part!r}: the rate is a fraction from 0 to 1")
        rates[name] = rate
    if not rates:
        raise ValueError("no vendors given (example: a=0.0,b=0.05,c=0.2)")
    return rates


def simulate_deliveries(
    data: ImageSet,
    vendor_rates: dict[str, float],
    per_vendor: int,
    home: Path,
    seed: int = 0,
    batch: str = "batch-001",
) -> pd.DataFrame:
    """Write one delivery per vendor under ``home/landing`` and the truth to ``home/truth.csv``.

    Each vendor labels ``per_vendor`` different images; exactly ``round(rate * per_vendor)`` of its
    labels are replaced by a uniformly drawn wrong class. Returns the truth rows written here.
    """
    rng = np.random.default_rng(seed)
    n_needed = per_vendor * len(vendor_rates)
    if n_needed > len(data.labels):
        raise ValueError(f"{data.name} has {len(data.labels)} images, {n_needed} requested")
    home = Path(home)
    _ensure_settings(home, data.classes)
    chosen = rng.permutation(len(data.labels))[:n_needed].reshape(len(vendor_rates), per_vendor)
    n_classes = len(data.classes)
    truth_rows = []
    for (vendor, rate), indices in zip(vendor_rates.items(), chosen):
        true = data.labels[indices]
        given = true.copy()
        wrong = rng.choice(per_vendor, size=int(round(rate * per_vendor)), replace=False)
        given[wrong] = (true[wrong] + rng.integers(1, n_classes, size=len(wrong))) % n_classes
        folder = home / "landing" / vendor / batch
        (folder / "images").mkdir(parents=True, exist_ok=True)
        names = [f"images/{index:06d}.png" for index in indices]
        for name, index in zip(names, indices):
            Image.fromarray(data.images[index]).save(folder / name)
        atomic_write_csv(folder / LABELS_FILE, pd.DataFrame(
            {"image": names, "label": [data.classes[g] for g in given], "annotator": f"{vendor}-team"}))
        (folder / READY_MARKER).write_text("")
        truth_rows.append(pd.DataFrame({
            "image_id": [f"{vendor}/{batch}/{n}" for n in names],
            "true_label": [data.classes[t] for t in true],
            "given_label": [data.classes[g] for g in given],
            "vendor": vendor,
        }))
    truth = pd.concat(truth_rows, ignore_index=True)
    truth_path = home / TRUTH_FILE
    if truth_path.is_file():
        old = pd.read_csv(truth_path, dtype=str, keep_default_na=False)
        truth = pd.concat([old[~old["image_id"].isin(truth["image_id"])], truth], ignore_index=True)
    atomic_write_csv(truth_path, truth)
    return truth


def _ensure_settings(home: Path, classes: tuple[str, ...]) -> None:
    if not (home / CONFIG_NAME).is_file():
        write_settings(home, Settings(classes=classes))
        return
    settings = load_settings(home)
    if settings.classes != classes:
        raise ValueError(f"{home / CONFIG_NAME}: its classes {list(settings.classes)} differ from the "
                         f"simulated dataset's {list(classes)}; use another --home")


def with_overrides(settings: Settings, **overrides) -> Settings:
    return replace(settings, **{k: v for k, v in overrides.items() if v is not None})
