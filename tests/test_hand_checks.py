"""Hand checks in the product: plan -> answers -> run, through the command line, Dagster and the sensor,
on one real trained home (3 vendors x 150 digits), plus the pieces that need no training."""

import contextlib
import hashlib
import io
import subprocess
import sys
from types import SimpleNamespace

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from conftest import make_home
from ml.check_plan import (
    VENDOR_CHECK_COLUMNS, CheckPlanError, Plan, apply_checks, draw_check_plan, read_plans, vendor_checks,
)
from ml.contract import CONTRACT_COLUMNS, with_contract
from ml.estimate import VendorRates
from ml.report import build_report
from ml.scorecard import (
    DISAGREE, SCORECARD_CHECK_COLUMNS, SCORECARD_COLUMNS, build_scorecard, compare_vendors, rate_basis,
)
from pipelines.automation import checks_sensor
from pipelines.cli import main
from pipelines.commands.demo import answer_demo_checks
from pipelines.home import open_instance
from pipelines.resources import AuditHome, MlflowTracking

BUDGET = 30


def _run(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(argv)
    return status, out.getvalue()


def _read(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """run -> plan -> answers (the demo's checker, an unplanned answer, a bad file, a gold file) -> run,
    with the checks sensor asked before and after."""
    home = make_home(tmp_path_factory.mktemp("checks") / "home", {"a": 0.0, "b": 0.1, "c": 0.3}, per_vendor=150,
                     heads=("l2softmax",))
    assert main(["run", "--home", str(home)]) == 0
    status, plan_output = _run(["plan", "--home", str(home), "--budget", str(BUDGET)])
    assert status == 0
    issues_before = _read(home / "reports" / "label_issues.csv")
    to_check = _read(home / "reports" / "check_plan.csv")
    truth = _read(home / "truth.csv").set_index("image_id")

    instance = open_instance(home)
    audit_home = AuditHome(home=str(home))
    resources = {"audit_home": audit_home, "mlflow_tracking": MlflowTracking(audit_home=audit_home)}

    def tick(cursor=None):
        with dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor) as context:
            return checks_sensor(context)

    before_answers = tick()
    answer_demo_checks(home, to_check)
    # two images no plan drew: one answered by hand (unplanned), one whose content is gold
    plan = _read(home / "plans" / "plan-001.csv")
    undrawn = plan[(plan["drawn"] == "False")].merge(truth.reset_index(), on=["image_id", "vendor"])
    unplanned = undrawn[(undrawn["vendor"] == "b") & (undrawn["given_label"] == undrawn["true_labels"])].iloc[0]
    gold_image = undrawn[(undrawn["vendor"] == "c") & (undrawn["given_label"] != undrawn["true_labels"])].iloc[0]
    other_class = next(c for c in "0123456789" if c != unplanned["given_label"])
    (home / "checks" / "extra.csv").write_text(f"image_id,true_labels,checker\n{unplanned['image_id']},{other_class},ann\n")
    answered = to_check.iloc[0]
    (home / "checks" / "zz-bad.csv").write_text(
        "image_id,true_labels\n"
        "a/batch-001/images/999999.png,3\n"                                  # row 1: unknown image
        f"{to_check.iloc[1]['image_id']},eleven\n"                            # row 2: unknown class
        f"{answered['image_id']},{truth.at[answered['image_id'], 'true_labels']}\n"  # row 3: answered in demo.csv
        f"{to_check.iloc[2]['image_id']},\n")                                 # row 4: empty answer
    digest = hashlib.sha256((home / "landing" / gold_image["image_id"]).read_bytes()).hexdigest()
    (home / "gold").mkdir(exist_ok=True)
    (home / "gold" / "honeypots.csv").write_text(
        f"sha256,true_labels\n{digest.upper()},{gold_image['true_labels']}\nnot-a-digest,3\n")

    first = tick()
    repeated = tick(first.cursor)
    runs_before = {r.dagster_run.run_id for r in instance.get_run_records()}
    status, run_output = _run(["run", "--home", str(home)])
    assert status == 0, run_output
    new_runs = [r.dagster_run for r in open_instance(home).get_run_records() if r.dagster_run.run_id not in runs_before]
    after_run = tick(first.cursor)
    return SimpleNamespace(home=home, plan_output=plan_output, run_output=run_output, to_check=to_check,
                           issues_before=issues_before, truth=truth, unplanned=unplanned, other_class=other_class,
                           gold_image=gold_image, answered=answered, instance=instance, new_runs=new_runs,
                           ticks=(before_answers, first, repeated, after_run))


def test_a_plan_spends_the_budget_over_every_image_and_lists_the_drawn_ones(loop):
    plan = pd.read_csv(loop.home / "plans" / "plan-001.csv")
    assert list(plan.columns) == ["image_id", "vendor", "inclusion_probability", "drawn"]
    assert len(plan) == 450 and plan["image_id"].is_unique
    np.testing.assert_allclose(plan.groupby("vendor")["inclusion_probability"].sum(), [BUDGET] * 3, rtol=1e-9)
    assert plan["inclusion_probability"].min() > 0 and plan["inclusion_probability"].max() <= 1
    # nothing answered yet when it was drawn: the list is exactly the drawn images
    listed = loop.to_check
    assert set(listed["image_id"]) == set(plan.loc[plan["drawn"], "image_id"])
    assert {"image_id", "vendor", "inclusion_probability", "image_path", "given_label", "p_error"} <= set(listed)
    probability = plan.set_index("image_id")["inclusion_probability"]
    np.testing.assert_allclose(listed["inclusion_probability"].astype(float),
                               probability.loc[listed["image_id"]], atol=1e-6)
    assert all((loop.home / path).is_file() for path in listed["image_path"])
    given = loop.issues_before.set_index("image_id")["given_label"]
    assert (listed["given_label"].to_numpy() == given.loc[listed["image_id"]].to_numpy()).all()
    markdown = (loop.home / "reports" / "check_plan.md").read_text()
    links = [line.split("](", 1)[1].split(")", 1)[0] for line in markdown.splitlines() if "](check_thumbs/" in line]
    assert len(links) == len(listed) and all((loop.home / "reports" / link).is_file() for link in links)
    for vendor in ("a", "b", "c"):  # printed: images to check now and the expected interval
        line = next(l for l in loop.plan_output.splitlines() if l.split()[:1] == [vendor])
        assert str((listed["vendor"] == vendor).sum()) in line.split() and line.count("%") == 3


def test_answers_fold_into_the_scorecard_without_retraining(loop):
    assert [r.job_name for r in loop.new_runs] == ["score_vendors"]  # a re-score, no training
    card = pd.read_csv(loop.home / "reports" / "scorecard.csv").set_index("vendor")
    columns = list(card.reset_index().columns)
    assert columns[:len(SCORECARD_COLUMNS)] == SCORECARD_COLUMNS
    # the contract's columns come last, after the hand checks' (README, Outputs)
    assert columns[-len(SCORECARD_CHECK_COLUMNS) - 1 - len(CONTRACT_COLUMNS):] == \
        SCORECARD_CHECK_COLUMNS + ["checks_version"] + CONTRACT_COLUMNS
    drawn = loop.to_check.groupby("vendor").size()
    assert card["n_checked"].to_dict() == {"a": drawn["a"], "b": drawn["b"], "c": drawn["c"] + 1}  # + c's gold image
    assert card["basis"].to_dict() == {v: f"checked ({n} checks)" for v, n in card["n_checked"].items()}
    assert card["checked_errors"]["a"] == 0 and card["checked_errors"]["c"] > 0
    for vendor in "abc":
        row = card.loc[vendor]
        assert row["error_rate_low"] <= row["error_rate"] <= row["error_rate_high"]
        assert row["checks_error_rate_low"] <= row["checks_error_rate"] <= row["checks_error_rate_high"]
        assert row["model_error_rate_low"] <= row["model_error_rate"] <= row["model_error_rate_high"]
    assert (card["error_rate"] != card["model_error_rate"]).any()  # the combined estimate replaced the model's
    checks_dvc = (loop.home / "checks.dvc").read_text()
    assert card["checks_version"].nunique() == 1 and card["checks_version"].iloc[0].removesuffix(".dir") in checks_dvc
    report = (loop.home / "reports" / "report.md").read_text()
    hand = report.split("## Hand checks\n", 1)[1].split("\n## ", 1)[0]
    assert "More checks to halve the interval" in hand and "1 answer for images no plan drew" in hand
    assert "1 gold image, 0.0% labelled correctly" in hand
    assert "hand checks: " in loop.run_output and "rows of checks/ quarantined" in loop.run_output


def test_each_checked_image_gets_the_verdict_of_its_check(loop):
    issues = _read(loop.home / "reports" / "label_issues.csv").set_index("image_id")
    before = loop.issues_before.set_index("image_id")
    planned = issues.loc[loop.to_check["image_id"]]
    truth = loop.truth.loc[planned.index, "true_labels"]
    assert (planned["checked_labels"] == truth).all()
    assert (planned["check_source"].str.startswith("checks/demo.csv row ")).all()
    wrong = planned["given_label"] != truth
    assert wrong.any() and (planned.loc[wrong, "verdict"] == "error").all()
    assert (planned.loc[wrong, "suggested_label"] == truth[wrong]).all()
    assert (planned.loc[~wrong, "verdict"] == "ok").all()
    assert (issues["model_verdict"] == before.loc[issues.index, "verdict"]).all()  # the model's verdict is kept
    assert (issues["p_error"] == before.loc[issues.index, "p_error"]).all()
    unplanned = issues.loc[loop.unplanned["image_id"]]  # answered outside any plan: the verdict follows
    assert unplanned["verdict"] == "error" and unplanned["suggested_label"] == loop.other_class
    assert unplanned["check_source"] == "checks/extra.csv row 1"
    unchecked = issues["checked_labels"] == ""
    assert (issues.loc[unchecked, "verdict"] == issues.loc[unchecked, "model_verdict"]).all()


def test_bad_answer_rows_are_quarantined_with_the_reason_and_nothing_is_lost(loop):
    quarantine = _read(loop.home / "quarantine" / "checks" / "zz-bad.csv")
    first = loop.answered["image_id"]
    assert dict(zip(quarantine["row"], quarantine["reason"])) == {
        "1": "unknown image id 'a/batch-001/images/999999.png'",
        "2": "unknown class 'eleven'",
        "3": f"already checked in demo.csv row {int(loop.to_check.index[loop.to_check['image_id'] == first][0]) + 1}",
        "4": "empty answer",
    }
    gold_quarantine = _read(loop.home / "quarantine" / "gold" / "honeypots.csv")
    assert gold_quarantine["reason"].tolist() == ["bad sha256 digest 'not-a-digest' (expected 64 hexadecimal characters)"]
    record = loop.instance.get_latest_asset_check_evaluation_record(dg.AssetCheckKey(dg.AssetKey("hand_checks"),
                                                                                      "answers_reconcile"))
    evaluation = record.event.dagster_event.event_specific_data
    assert evaluation.passed
    assert {k: v.value for k, v in evaluation.metadata.items()} == {
        "rows": len(loop.to_check) + 1 + 4 + 2, "accepted": len(loop.to_check) + 1 + 1, "quarantined": 5}
    # the delivery quarantine the report reads is not confused by the answers' quarantine
    assert "## Input problems" in (loop.home / "reports" / "report.md").read_text()


def test_a_gold_file_is_matched_by_image_content(loop):
    issues = _read(loop.home / "reports" / "label_issues.csv").set_index("image_id")
    gold = issues.loc[loop.gold_image["image_id"]]
    assert gold["check_source"] == "gold/honeypots.csv row 1" and gold["verdict"] == "error"
    card = pd.read_csv(loop.home / "reports" / "scorecard.csv").set_index("vendor")
    assert card["gold_images"].to_dict() == {"a": 0, "b": 0, "c": 1}
    assert card.at["c", "gold_accuracy"] == 0.0 and card["gold_accuracy"].isna().sum() == 2
    answers = _read(loop.home / "reports" / "hand_checks.csv")
    assert answers.loc[answers["kind"] == "gold", "image_id"].tolist() == [loop.gold_image["image_id"]]


def test_the_sensor_requests_one_rescore_per_change_of_the_answers(loop):
    before_answers, first, repeated, after_run = loop.ticks
    assert not before_answers.run_requests and "unchanged" in before_answers.skip_reason.skip_message
    assert len(first.run_requests) == 1 and first.cursor
    assert not repeated.run_requests and "already requested" in repeated.skip_reason.skip_message
    assert not after_run.run_requests and "unchanged since the last scorecard" in after_run.skip_reason.skip_message
    defs_job = checks_sensor.job_name
    assert defs_job == "score_vendors"
    # nothing changed: `run` runs nothing
    runs = {r.dagster_run.run_id for r in loop.instance.get_run_records()}
    assert _run(["run", "--home", str(loop.home)])[0] == 0
    assert {r.dagster_run.run_id for r in open_instance(loop.home).get_run_records()} == runs


def test_a_second_plan_adds_to_the_first_and_never_lists_answered_images(loop):
    """Runs last in this module: it adds a plan."""
    status, output = _run(["plan", "--home", str(loop.home), "--halfwidth", "0.05"])
    assert status == 0 and "check plan 002" in output
    first, second = (pd.read_csv(loop.home / "plans" / f"plan-00{n}.csv").set_index("image_id") for n in (1, 2))
    listed = _read(loop.home / "reports" / "check_plan.csv")
    answers = _read(loop.home / "reports" / "hand_checks.csv")
    assert not set(listed["image_id"]) & set(answers["image_id"])
    assert set(listed["image_id"]) == set(second.index[second["drawn"]]) - set(answers["image_id"])
    combined = 1 - (1 - first["inclusion_probability"]) * (1 - second.loc[first.index, "inclusion_probability"])
    np.testing.assert_allclose(listed["inclusion_probability"].astype(float),
                               combined.loc[listed["image_id"]], atol=1e-6)
    # checks/, gold/ and plans/ are versioned: the new plan at once, the answers by the audit
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=loop.home, capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout.split() == ["ingest:", "always", "changed"], status.stdout
    assert all((loop.home / f"{folder}.dvc").is_file() for folder in ("checks", "gold", "plans"))


# ---- no training needed ---------------------------------------------------------------------------------


def test_plan_before_any_audit_and_a_bad_plan_file_are_clear_errors(tmp_path, capsys):
    home = make_home(tmp_path / "home", {"a": 0.0}, per_vendor=10)
    assert main(["plan", "--home", str(home), "--budget", "5"]) == 2
    assert "no audit yet: run vendor-audit run" in capsys.readouterr().err
    (home / "plans").mkdir()
    (home / "plans" / "plan-001.csv").write_text("image_id,vendor,inclusion_probability,drawn\nx,a,1.5,True\n")
    with pytest.raises(CheckPlanError, match=r"plan-001.csv: row 1: inclusion_probability '1.5' is not a number"):
        read_plans(home / "plans")
    with pytest.raises(SystemExit):
        main(["plan", "--home", str(home), "--budget", "5", "--halfwidth", "0.02"])


def _issues(n_per_vendor: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for vendor in ("a", "b"):
        for i in range(n_per_vendor):
            rows.append({"image_id": f"{vendor}/batch-1/{i:04d}.png", "vendor": vendor, "batch": "batch-1",
                         "given_label": "cat", "suggested_label": "cat", "p_error": round(rng.random() * 0.2, 4),
                         "verdict": "ok"})
    return pd.DataFrame(rows)


def test_design_checks_gold_unplanned_answers_and_images_outside_any_plan():
    issues = _issues()
    plan = draw_check_plan(issues, set(), set(), [], budget=40)
    plans = [Plan(1, plan.plan)]
    drawn = plan.plan.loc[plan.plan["drawn"], "image_id"]
    undrawn = plan.plan.loc[~plan.plan["drawn"], "image_id"]
    answers = pd.DataFrame({
        "image_id": [*drawn, undrawn.iloc[0], undrawn.iloc[1]], "true_labels": ["cat"] * len(drawn) + ["dog", "cat|dog"],
        "kind": ["check"] * (len(drawn) + 1) + ["gold"],
        "source": [f"checks/x.csv row {i}" for i in range(len(drawn) + 1)] + ["gold/g.csv row 1"]})
    checked = apply_checks(issues, answers)
    assert checked.set_index("image_id").at[undrawn.iloc[1], "verdict"] == "ambiguous"  # in a set of two: not billed
    rates = VendorRates(*(np.array([0.1, 0.1]),) * 3, np.zeros((10, 2)), *(np.zeros(2),) * 3, np.array([300, 300]),
                        np.zeros(2, bool))
    table = vendor_checks(checked, plans, ["a", "b"], np.array([0.05, 0.05]), np.array([0.15, 0.15])).set_index("vendor")
    gold_vendor = undrawn.iloc[1].split("/")[0]
    unplanned_vendor = undrawn.iloc[0].split("/")[0]
    expected = drawn.str[0].value_counts().reindex(["a", "b"], fill_value=0)
    expected[gold_vendor] += 1
    assert table["n_checked"].to_dict() == expected.to_dict() and table["checked_errors"].sum() == 0
    assert table.at[unplanned_vendor, "unplanned_checks"] == 1 and table["combined"].all()
    assert table.at[gold_vendor, "gold_images"] == 1 and table.at[gold_vendor, "gold_accuracy"] == 1.0
    assert (table["checks_to_halve"] > 0).all()
    # a delivery that arrived after the plan: its images have no probability, the rate stays the model's
    late = pd.concat([checked, checked.assign(image_id=checked["image_id"].str.replace("batch-1", "batch-2"),
                                              checked_labels="", check_source="")], ignore_index=True)
    later = vendor_checks(late, plans, ["a", "b"], rates.low, rates.high).set_index("vendor")
    assert not later["combined"].any() and (later["outside_plans"] == 300).all()
    assert later["combined_rate"].isna().all() and later["n_checked"].to_dict() == expected.to_dict()


def test_comparisons_use_the_combined_intervals_where_a_vendor_has_checks():
    names = ["a", "b", "c"]
    rates = VendorRates(np.array([0.02, 0.10, 0.05]), np.array([0.0, 0.06, 0.02]), np.array([0.06, 0.14, 0.09]),
                        np.random.default_rng(0).normal([0.02, 0.10, 0.05], 0.02, (200, 3)), *(np.zeros(3),) * 3,
                        np.array([500, 500, 100]), np.zeros(3, bool))
    checks = pd.DataFrame({"vendor": names, "combined": [True, False, True],
                           "combined_rate": [0.01, np.nan, 0.04], "combined_low": [0.005, np.nan, 0.0],
                           "combined_high": [0.015, np.nan, 0.08]})
    table = compare_vendors(names, rates, checks=checks).set_index(["vendor_a", "vendor_b"])
    ab = table.loc[("a", "b")]
    assert ab["difference"] == pytest.approx(0.01 - 0.10)
    se = np.hypot(0.01, 0.08) / (2 * 1.959964)
    assert ab["difference_high"] - ab["difference_low"] == pytest.approx(2 * 1.959964 * se, abs=2e-4)
    assert ab["conclusion"] == "a has fewer errors than b"
    assert table.loc[("a", "c"), "conclusion"] == "not compared: too few images to rate c"  # the min-images rule holds
    assert table["p_holm"].notna().sum() == 1


def test_the_report_has_a_hand_checks_section():
    from test_report import CLASSES, VENDORS, _comparisons, _confusion, _images, _issues as report_issues, \
        _quarantined, _scorecard

    issues = report_issues()
    card = _scorecard().assign(n_checked=[40, 0, 0], checked_errors=[1, 0, 0], checks_error_rate=[0.02, None, None],
                               checks_error_rate_low=[0.001, None, None], checks_error_rate_high=[0.12, None, None])
    checks = pd.DataFrame({"vendor": VENDORS, "n_checked": [40, 0, 0], "checked_errors": [1, 0, 0],
                           "checks_error_rate": [0.02, None, None], "checks_error_rate_low": [0.001, None, None],
                           "checks_error_rate_high": [0.12, None, None], "combined": [True, False, False],
                           "combined_rate": [0.0123, None, None], "combined_low": [0.0041, None, None],
                           "combined_high": [0.0245, None, None], "gold_images": [0, 2, 0],
                           "gold_accuracy": [None, 0.5, None], "unplanned_checks": [0, 3, 0],
                           "awaiting_answers": [5, 0, 0], "outside_plans": [0, 380, 12], "checks_to_halve": [40, 120, 12]})
    report = build_report(card, _comparisons(), issues, _confusion(), VENDORS, CLASSES, {}, images=_images(issues),
                          quarantined=_quarantined(), quarantine_warn_share=0.05, n_boot=200, hand_checks=checks)
    section = report.markdown.split("## Hand checks\n", 1)[1].split("\n## ", 1)[0]
    assert "| a | 40 | 1 | 2.0% (0.1-12.0%) | 1.2% (0.4-2.5%) | 40 |" in section
    assert "| b | 0 | 0 | - | - | 120 |" in section
    assert "**b**: 3 answers for images no plan drew" in section and "**a**: 5 planned images not answered" in section
    assert "**b**: 2 gold images, 50.0% labelled correctly" in section
    assert "combines the checks with the model (see Hand checks)" in report.markdown
    summary = report.markdown.split("## Summary\n", 1)[1].split("\n## ", 1)[0]
    # the advice to plan names the planner's own figures for the rated vendors (c is too small to rate)
    assert "vendor-audit plan --budget N" in summary and "Checks expected to halve each interval: a 40, b 120." in summary


def _card_with_checks(b_checked: tuple[float, float, float], checks: bool = True) -> pd.DataFrame:
    """A scorecard built as the asset builds it: a and b rated (500 images), c too small (100); the model
    reads b at 3.5% [1.6, 5.6]; with ``checks``, a's and b's rates combine hand checks (b's combined rate,
    low, high: ``b_checked``; a's with 1 check), c has none."""
    names = ["a", "b", "c"]
    rates = VendorRates(np.array([0.02, 0.035, 0.05]), np.array([0.01, 0.016, 0.02]), np.array([0.04, 0.056, 0.09]),
                        np.random.default_rng(0).normal([0.02, 0.035, 0.05], 0.01, (200, 3)), np.zeros(3),
                        np.full(3, 0.8), np.full(3, 0.05), np.array([500, 500, 100]), np.zeros(3, bool))
    frame = pd.DataFrame({
        "vendor": names, "n_checked": [1, 84, 0], "checked_errors": [0, 14, 0],
        "checks_error_rate": [0.0, 0.117, np.nan], "checks_error_rate_low": [0.0, 0.058, np.nan],
        "checks_error_rate_high": [0.79, 0.221, np.nan], "combined": [True, True, False],
        "combined_rate": [0.02, b_checked[0], np.nan], "combined_low": [0.0, b_checked[1], np.nan],
        "combined_high": [0.79, b_checked[2], np.nan], "gold_images": 0, "gold_accuracy": np.nan,
        "unplanned_checks": 0, "awaiting_answers": 0, "outside_plans": 0, "checks_to_halve": [2, 100, 50]},
        columns=VENDOR_CHECK_COLUMNS)
    group = np.repeat([0, 1, 2], [500, 500, 100])
    return build_scorecard(names, group, np.full(len(group), "ok"), rates, checks=frame if checks else None)


DISAGREEING = (0.11, 0.08, 0.14)  # b checked: 11.0% [8.0, 14.0], above the model's 3.5% [1.6, 5.6]
AGREEING = (0.05, 0.03, 0.08)


def test_every_row_names_the_basis_of_its_interval():
    model_only = _card_with_checks(AGREEING, checks=False)
    columns = list(model_only.columns)
    assert columns[columns.index("ambiguous_rate") + 1] == "basis" and columns[-1] == "basis"
    assert (model_only["basis"] == "model only").all()
    card = _card_with_checks(AGREEING).set_index("vendor")
    assert list(card.columns).index("basis") < list(card.columns).index("n_checked")  # before the optional ones
    assert card["basis"].to_dict() == {"a": "checked (1 check)", "b": "checked (84 checks)", "c": "model only"}
    assert (rate_basis(card) == pd.Series({"a": "checked", "b": "checked", "c": "model only"})).all()
    assert not card["note"].str.contains(DISAGREE).any()  # overlapping intervals: nothing to warn of


def test_checks_that_disagree_with_the_model_are_said_and_decide_the_verdict():
    card = _card_with_checks(DISAGREEING)
    warning = ("hand checks disagree with the model-only estimate (model only 3.5% [1.6, 5.6], checked 11.0% "
               "[8.0, 14.0]): the model misses some of this vendor's errors (or sees errors that are not there); "
               "the verdict rests on the checks")
    assert card.set_index("vendor")["note"].to_dict() == {
        "a": "", "b": warning, "c": "too few images to rate (100 < 200): no rank, no comparison"}
    # the contract judges the checked 11.0% [8.0, 14.0], not the model's 3.5% [1.6, 5.6] (which is below 7%)
    contract = with_contract(card, {"b": 0.07}, _issues(), []).set_index("vendor")
    assert contract.at["b", "contract_verdict"] == "breach" and contract.at["b", "contract_action"] == "drop"
    report = _report_of(card)
    summary = report.split("## Summary\n", 1)[1].split("\n## ", 1)[0]
    escaped = warning.replace("[", r"\[").replace("]", r"\]")  # as Markdown writes brackets
    assert f"- **b**: {escaped}." in summary
    assert summary.count("hand checks disagree") == 1  # not repeated among the warnings to read
    assert "b has more errors**: an estimated 11.0% (8.0-14.0%, checked)" in summary
    # every rated rate combines checks: nothing rests on the model alone, nothing more to plan for it
    assert "Model-only figures" not in summary and "check-based" not in summary
    agreeing = _report_of(_card_with_checks(AGREEING))
    assert "hand checks disagree" not in agreeing
    assert "**b has more errors**: an estimated 5.0% (3.0-8.0%, checked)" in agreeing


def _report_of(card: pd.DataFrame) -> str:
    """The report's Markdown for ``card`` (vendors a, b, c) on the report tests' other inputs."""
    from test_report import CLASSES, _confusion, _images, _issues as report_issues, _quarantined

    issues = report_issues()
    comparisons = pd.DataFrame({"vendor_a": ["a"], "vendor_b": ["b"], "difference": [-0.09], "difference_low": [-0.12],
                                "difference_high": [-0.06], "p_value": [0.001], "p_holm": [0.001], "p_text": ["0.001"],
                                "conclusion": ["a has fewer errors than b"]})
    return build_report(card, comparisons, issues, _confusion(), ["a", "b", "c"], CLASSES, {}, images=_images(issues),
                        quarantined=_quarantined().iloc[:0], quarantine_warn_share=0.05, n_boot=200).markdown
