"""The whole audit through the command line on real parts: DVC, MLflow, Dagster, real images."""

import io
import json
import subprocess
import sys

import dagster as dg
import mlflow
import pandas as pd

from ml.audit import ISSUE_COLUMNS
from ml.history import read_history
from ml.scorecard import SCORECARD_COLUMNS
from ml.datasets import load_digits_upscaled
from ml.simulate import simulate_deliveries
from pipelines.cli import main
from pipelines.home import open_instance


def test_scorecard_ranks_vendors_by_their_true_error_rates(audited_home):
    card = pd.read_csv(audited_home / "reports" / "scorecard.csv")
    assert list(card.columns[:len(SCORECARD_COLUMNS)]) == SCORECARD_COLUMNS
    assert card["vendor"].tolist() == ["a", "b", "c"] and card["rank"].tolist() == [1, 2, 3]
    assert (card["error_rate_low"] <= card["error_rate"]).all() and (card["error_rate"] <= card["error_rate_high"]).all()
    assert card.loc[0, "error_rate"] < 0.05 and 0.2 < card.loc[2, "error_rate"] < 0.4
    issues = pd.read_csv(audited_home / "reports" / "label_issues.csv")
    assert list(issues.columns[:len(ISSUE_COLUMNS)]) == ISSUE_COLUMNS and len(issues) == 900
    assert set(issues["prediction"]) == {"out-of-fold"}
    truth = pd.read_csv(audited_home / "truth.csv")
    merged = issues.merge(truth[["image_id", "true_label"]], on="image_id")
    wrong = merged["given_label"].astype(str) != merged["true_label"].astype(str)
    flagged = merged["verdict"] == "error"
    assert (flagged & wrong).sum() / flagged.sum() > 0.7  # precision of the error verdict
    report = (audited_home / "reports" / "report.md").read_text()
    assert "## Pairwise comparison" in report and "plots/confusion-c.png" in report
    assert (audited_home / "reports" / "plots" / "confusion-c.png").stat().st_size > 1000


def test_dataset_version_and_mlflow_run_point_at_each_other(audited_home):
    provenance = json.loads((audited_home / "reports" / "provenance.json").read_text())
    dvc_file = (audited_home / "curated.dvc").read_text()
    version = provenance["dataset_version"]
    assert version.removesuffix(".dir") in dvc_file
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=audited_home, capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout.split() == ["ingest:", "always", "changed"], status.stdout
    mlflow.set_tracking_uri(f"sqlite:///{audited_home / 'mlflow' / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["vendor-audit"], filter_string=f"tags.dataset_version = '{version}'")
    assert sorted(runs["tags.head"]) == ["l2softmax", "softmax"]
    assert provenance["mlflow_run"] in set(runs["run_id"])
    assert runs["metrics.heldout_accuracy"].min() > 0.6
    folds = [f"metrics.heldout_accuracy_fold{k}" for k in (1, 2, 3)]  # folds count from 1, beside the overall
    assert set(folds) | {"metrics.train_loss_fold1"} <= set(runs.columns) and "metrics.train_loss_fold0" not in runs
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("vendor-audit")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the model-training view
    inputs = client.get_run(provenance["mlflow_run"]).inputs.dataset_inputs
    assert [i.dataset.digest for i in inputs] == [version[:36]]  # the Dataset column: the DVC version
    source = json.loads(inputs[0].dataset.source)
    assert (audited_home / "dvc-remote").as_posix() in json.dumps(source) and version[2:] in json.dumps(source)
    versions = client.search_model_versions("name = 'vendor-audit-classifier'")
    assert {v.tags["dataset_version"] for v in versions} == {version}
    assert {(v.tags["head"], v.tags["backbone"], v.tags["training"]) for v in versions} == {
        ("softmax", "small_cnn", "scratch"), ("l2softmax", "small_cnn", "scratch")}
    artifacts = [a.path for a in client.list_artifacts(provenance["mlflow_run"], "audit-report")]
    assert "audit-report/scorecard.csv" in artifacts


def test_run_without_settings_is_a_clear_error(tmp_path, capsys):
    assert main(["run", "--home", str(tmp_path)]) == 2
    assert "vendor-audit.yaml: settings file not found" in capsys.readouterr().err


def _materialized(instance, after_run_ids: set) -> dict[str, set]:
    """Asset name -> partitions (None for unpartitioned) materialized by runs not in ``after_run_ids``."""
    done: dict[str, set] = {}
    for record in instance.get_run_records():
        if record.dagster_run.run_id in after_run_ids:
            continue
        for event in instance.all_logs(record.dagster_run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
            materialization = event.dagster_event.step_materialization_data.materialization
            done.setdefault(materialization.asset_key.to_user_string(), set()).add(materialization.partition)
    return done


def test_new_delivery_is_scored_by_the_champion_without_retraining(audited_home, capsys):
    """Runs last in this module: it adds a delivery to the shared home."""
    instance = open_instance(audited_home)
    event = instance.get_latest_materialization_event(dg.AssetKey("vendor_scorecard"))
    version = json.loads((audited_home / "reports" / "provenance.json").read_text())["dataset_version"]
    assert event.asset_materialization.metadata["dataset_version"].value == version
    assert sorted(instance.get_dynamic_partitions("deliveries")) == ["a.batch-001", "b.batch-001", "c.batch-001"]
    champion = json.loads((audited_home / "reports" / "provenance.json").read_text())["model_version"]

    # nothing new: nothing runs, nothing changes
    before = {r.dagster_run.run_id for r in instance.get_run_records()}
    scorecard_before = (audited_home / "reports" / "scorecard.csv").read_bytes()
    assert main(["run", "--home", str(audited_home)]) == 0
    assert {r.dagster_run.run_id for r in open_instance(audited_home).get_run_records()} == before
    assert (audited_home / "reports" / "scorecard.csv").read_bytes() == scorecard_before
    assert "true_error_rate" in capsys.readouterr().out

    # --rescore: the scoring job runs again with the champion (no training), to the same scorecard
    assert main(["run", "--home", str(audited_home), "--rescore"]) == 0
    rescored = _materialized(open_instance(audited_home), before)
    assert set(rescored) == {"curated_dataset", "hand_checks", "label_issues", "vendor_scorecard"}
    assert pd.read_csv(audited_home / "reports" / "scorecard.csv").equals(pd.read_csv(io.BytesIO(scorecard_before)))
    before = {r.dagster_run.run_id for r in open_instance(audited_home).get_run_records()}
    # the same data, model and checks: the history keeps one audit (its re-run replaced, not added)
    history = read_history(audited_home / "history" / "scorecards.parquet")
    assert list(history["dataset_version"]) == [version] * 3 and history["audited_at"].nunique() == 1
    assert "plots/trend-audits.png" not in (audited_home / "reports" / "report.md").read_text()

    # a new delivery: only its partition is ingested and scored, by the champion, with no retraining
    simulate_deliveries(load_digits_upscaled(), {"d": 0.2}, 150, audited_home, seed=9, batch="batch-002")
    assert main(["run", "--home", str(audited_home)]) == 0
    instance = open_instance(audited_home)
    done = _materialized(instance, before)
    assert done.pop("vendor_delivery") == {"d.batch-002"} and done.pop("batch_scores") == {"d.batch-002"}
    assert set(done) == {"curated_dataset", "hand_checks", "label_issues", "vendor_scorecard"}  # no cv_models
    issues = pd.read_csv(audited_home / "reports" / "label_issues.csv", dtype=str)
    new = issues[issues["vendor"] == "d"]
    assert len(new) == 150 and set(new["prediction"]) == {"new delivery"}
    assert set(issues["model_version"]) == {champion}
    card = pd.read_csv(audited_home / "reports" / "scorecard.csv")
    assert "d" in set(card["vendor"]) and card["dataset_version"].nunique() == 1
    assert card.loc[0, "dataset_version"] != version  # the new delivery made a new dataset version
    _assert_history_of_two_audits(audited_home, version, card)

    after = {r.dagster_run.run_id for r in instance.get_run_records()}
    assert main(["run", "--home", str(audited_home)]) == 0
    assert {r.dagster_run.run_id for r in open_instance(audited_home).get_run_records()} == after


def _git(home, *args: str) -> str:
    return subprocess.run(["git", f"--git-dir={home / '.git'}", *args], capture_output=True, text=True,
                          check=True).stdout


def _assert_history_of_two_audits(home, first_version: str, card: pd.DataFrame) -> None:
    """Each audit's scorecard kept: rates of both nights side by side, versioned by DVC and committed
    with the audit; the report plots them."""
    history = read_history(home / "history" / "scorecards.parquet")
    assert history["audited_at"].nunique() == 2
    assert list(history.drop_duplicates("audited_at")["dataset_version"]) == [first_version,
                                                                                card.loc[0, "dataset_version"]]
    newest = history[history["dataset_version"] == card.loc[0, "dataset_version"]].set_index("vendor")
    assert sorted(newest.index) == sorted(card["vendor"])
    assert newest.loc[card["vendor"], "error_rate"].tolist() == card["error_rate"].tolist()
    assert set(history[history["dataset_version"] == first_version]["vendor"]) == {"a", "b", "c"}
    # DVC holds the table (cache and remote); the audit's commit records its version
    committed = _git(home, "show", "HEAD:history.dvc")
    md5 = committed.split("md5: ", 1)[1].split()[0]
    assert (home / "dvc-remote" / "files" / "md5" / md5[:2] / md5[2:]).exists()
    assert "audit " in _git(home, "log", "-1", "--format=%s")
    report = (home / "reports" / "report.md").read_text()
    assert "## Over time" in report and "plots/trend-audits.png" in report
    assert (home / "reports" / "plots" / "trend-audits.png").read_bytes().startswith(b"\x89PNG")
    page = (home / "reports" / "report.html").read_text()
    assert 'alt="error rate per audit"' in page and "plots/trend-audits.png" not in page  # inlined, not linked


def test_two_deliveries_landing_at_once_are_both_ingested_once(audited_home):
    """Runs after the single-delivery test: two deliveries land together and two `run` processes start
    at the same moment (a sensor tick and a person at the terminal)."""
    digits = load_digits_upscaled()
    simulate_deliveries(digits, {"e": 0.1}, 120, audited_home, seed=11, batch="batch-003")
    simulate_deliveries(digits, {"f": 0.0}, 80, audited_home, seed=12, batch="batch-003")
    before = {r.dagster_run.run_id for r in open_instance(audited_home).get_run_records()}
    command = [sys.executable, "-m", "pipelines.cli", "run", "--home", str(audited_home)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    assert sum("waiting for the audit of" in out for out in outputs) == 1  # the second waited its turn

    instance = open_instance(audited_home)
    done = _materialized(instance, before)
    assert done["vendor_delivery"] == {"e.batch-003", "f.batch-003"}
    ingestions = [r for r in instance.get_run_records() if r.dagster_run.run_id not in before
                  and r.dagster_run.job_name == "ingest_deliveries"]
    assert sorted(r.dagster_run.tags["dagster/partition"] for r in ingestions) == ["e.batch-003", "f.batch-003"]
    issues = pd.read_csv(audited_home / "reports" / "label_issues.csv", dtype=str)
    assert issues["image_id"].is_unique
    assert issues["vendor"].value_counts()[["e", "f"]].tolist() == [120, 80]
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=audited_home, capture_output=True, text=True)
    assert status.returncode == 0 and status.stdout.split() == ["ingest:", "always", "changed"], status.stdout


def test_bad_delivery_after_training_is_rejected_whole_and_the_good_one_beside_it_is_scored(audited_home):
    """Runs after the tests above: a champion exists, so the new deliveries go through batch_scores."""
    simulate_deliveries(load_digits_upscaled(), {"g": 0.1, "h": 0.1}, 60, audited_home, seed=13, batch="batch-004")
    labels = audited_home / "landing" / "g" / "batch-004" / "labels.csv"
    labels.write_bytes(b"image,label\nimages/000000.png,\xff\xfe\n")  # not UTF-8
    assert main(["run", "--home", str(audited_home)]) == 3
    quarantined = pd.read_csv(audited_home / "quarantine" / "g" / "batch-004.csv", keep_default_na=False)
    assert quarantined["row"].tolist() == [0] and "line 2: not UTF-8 text" in quarantined.loc[0, "reason"]
    issues = pd.read_csv(audited_home / "reports" / "label_issues.csv", dtype=str)
    assert "g" not in set(issues["vendor"]) and (issues["vendor"] == "h").sum() == 60
