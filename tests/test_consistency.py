"""Same labels, same rate: deliveries that land after training, small vendors, on the whole pipeline."""

import shutil

import pandas as pd
import pytest

from conftest import make_home
from ml.datasets import load_digits_upscaled
from ml.delivery import READY_MARKER
from ml.simulate import simulate_deliveries
from pipelines.cli import main


def _card(home):
    return pd.read_csv(home / "reports" / "scorecard.csv").set_index("vendor")


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory):
    home = make_home(tmp_path_factory.mktemp("consistency") / "home", {"a": 0.0, "b": 0.1, "c": 0.3}, per_vendor=300)
    assert main(["run", "--home", str(home)]) == 0
    return home


def test_a_byte_copy_landed_after_training_gets_the_same_rate(trained_home):
    home = trained_home
    before = _card(home)
    # the copy's vendor name sorts before the original's: which copy came first is the order of arrival
    source, copy = home / "landing" / "c" / "batch-001", home / "landing" / "acopy" / "batch-001"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns(READY_MARKER))
    (copy / READY_MARKER).write_text("")
    assert main(["run", "--home", str(home)]) == 0
    card = _card(home)
    assert abs(card.loc["acopy", "error_rate"] - card.loc["c", "error_rate"]) < 0.01
    comparisons = pd.read_csv(home / "reports" / "comparisons.csv")
    pair = comparisons[comparisons[["vendor_a", "vendor_b"]].apply(set, axis=1) == {"c", "acopy"}].iloc[0]
    assert pair["conclusion"] == "not distinguishable with this data"
    issues = pd.read_csv(home / "reports" / "label_issues.csv", keep_default_na=False)
    copied = issues[issues["vendor"] == "acopy"]
    assert set(copied["prediction"]) == {"new delivery"} and (copied["duplicate_of"].str.startswith("c/")).all()
    assert (issues.loc[issues["vendor"] == "c", "duplicate_of"] == "").all()
    assert "**acopy** delivered 300 images that c had already delivered." in (home / "reports" / "report.md").read_text()
    # each copied image has exactly its original's probability of error
    original = issues.set_index("image_id")["p_error"]
    assert (copied["p_error"].to_numpy() == original.loc[copied["duplicate_of"]].to_numpy()).all()
    # the vendors already there moved by less than a third of their interval's width
    for vendor in ("a", "b", "c"):
        width = before.loc[vendor, "error_rate_high"] - before.loc[vendor, "error_rate_low"]
        assert abs(card.loc[vendor, "error_rate"] - before.loc[vendor, "error_rate"]) < width / 3


def test_vendors_with_few_images_are_not_rated_and_claim_nothing(trained_home):
    home = trained_home
    digits = load_digits_upscaled()
    simulate_deliveries(digits, {"tiny": 0.0}, 3, home, seed=7)
    simulate_deliveries(digits, {"hundred": 0.0}, 100, home, seed=8)
    assert main(["run", "--home", str(home)]) == 0
    card = _card(home)
    for vendor, n in (("tiny", 3), ("hundred", 100)):
        assert card.loc[vendor, "n_images"] == n and card.loc[vendor, "status"] == "too few images to rate"
        assert pd.isna(card.loc[vendor, "rank"]) and f"{n} < 200" in card.loc[vendor, "note"]
    assert card.loc["tiny", "error_rate_high"] >= 0.70  # 0 errors in 3 images leaves up to 71%
    assert card.loc["hundred", "error_rate_low"] == 0.0 and card.loc["hundred", "error_rate"] < 0.1
    comparisons = pd.read_csv(home / "reports" / "comparisons.csv")
    involved = comparisons["vendor_a"].isin(["tiny", "hundred"]) | comparisons["vendor_b"].isin(["tiny", "hundred"])
    assert comparisons.loc[involved, "conclusion"].str.startswith("not compared: too few images").all()
    assert comparisons["difference_low"].ge(-1).all() and comparisons["difference_high"].le(1).all()
    # the rated vendors keep their order
    assert card.loc["a", "rank"] < card.loc["b", "rank"] < card.loc["c", "rank"]
