import os
from dataclasses import replace
from pathlib import Path

import pytest

from ml.config import load_settings, write_settings
from ml.datasets import load_digits_upscaled
from ml.simulate import simulate_deliveries

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# Small but real: enough steps for the CNN to learn 3x300 digits, few enough for CI.
FAST = dict(epochs=12, batch_size=32, folds=3, bootstrap=50)


def make_home(home: Path, vendors: dict[str, float], per_vendor: int, seed: int = 0, **overrides) -> Path:
    """A home with simulated digits deliveries and fast training settings."""
    simulate_deliveries(load_digits_upscaled(), vendors, per_vendor, home, seed=seed)
    write_settings(home, replace(load_settings(home), **{**FAST, **overrides}))
    return home


@pytest.fixture
def small_home(tmp_path: Path) -> Path:
    return make_home(tmp_path / "home", {"a": 0.0, "b": 0.2}, per_vendor=60)


@pytest.fixture(scope="session")
def audited_home(tmp_path_factory) -> Path:
    """3 vendors x 300 digits at 0/10/30% wrong labels, run once through the whole CLI."""
    from pipelines.cli import main

    # both heads, so that the run logs two models and the champion is chosen between them
    home = make_home(tmp_path_factory.mktemp("e2e") / "home", {"a": 0.0, "b": 0.1, "c": 0.3}, per_vendor=300,
                     heads=("softmax", "l2softmax"))
    assert main(["run", "--home", str(home)]) == 0
    return home
