"""The real MLflow and Dagster servers, on 127.0.0.1, show what the audit recorded."""

import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipelines.servers import LOCAL, dagster_dev_command, free_port, http_json, mlflow_server_command, running


def test_mlflow_server_lists_runs_metrics_and_registered_versions(audited_home, tmp_path):
    port = free_port()
    command, env = mlflow_server_command(audited_home, port)
    base = f"http://127.0.0.1:{port}"
    with running(command, f"{base}/health", env, tmp_path / "mlflow.log", timeout=120) as server:
        experiment = http_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=vendor-audit")
        experiment_id = experiment["experiment"]["experiment_id"]
        runs = http_json(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})["runs"]
        heads = {}
        for run in runs:
            tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
            metrics = {m["key"]: m["value"] for m in run["data"].get("metrics", [])}
            assert {"heldout_accuracy", "heldout_accuracy_fold1", "train_loss_fold1"} <= set(metrics)
            assert tags["dataset_version"].endswith(".dir")
            # the run's input: the curated dataset, named by its DVC version (the UI's Dataset column)
            inputs = run["inputs"]["dataset_inputs"]
            assert [i["dataset"]["digest"] for i in inputs] == [tags["dataset_version"][:36]]
            assert inputs[0]["dataset"]["name"] == "curated"
            heads[tags["head"]] = metrics["heldout_accuracy"]
        assert set(heads) == {"softmax", "l2softmax"}  # one experiment, the same metric names
        model = http_json(f"{base}/api/2.0/mlflow/registered-models/get?name=vendor-audit-classifier")
        assert model["registered_model"]["name"] == "vendor-audit-classifier"
        champion = http_json(f"{base}/api/2.0/mlflow/registered-models/alias?name=vendor-audit-classifier&alias=champion")
        tags = {t["key"]: t["value"] for t in champion["model_version"]["tags"]}
        assert tags["head"] in heads and tags["dataset_version"].endswith(".dir")
        pid = server.pid
    assert server.poll() is not None, f"mlflow server {pid} still running"


GRAPHQL = """
{
  assetNodes { assetKey { path } dependencyKeys { path } partitionKeys }
  workspaceOrError { ... on Workspace { locationEntries { locationOrLoadError {
    ... on RepositoryLocation { repositories { sensors { name } schedules { name cronSchedule } } } } } } }
}
"""


def test_dagster_webserver_shows_lineage_partitions_sensor_and_schedule(audited_home, tmp_path):
    port = free_port()
    command, env = dagster_dev_command(audited_home, port)
    base = f"http://127.0.0.1:{port}"
    with running(command, f"{base}/server_info", env, tmp_path / "dagster.log", timeout=180) as server:
        data = http_json(f"{base}/graphql", {"query": GRAPHQL}, timeout=60)["data"]
        nodes = {"/".join(n["assetKey"]["path"]): n for n in data["assetNodes"]}
        parents = {name: {"/".join(d["path"]) for d in n["dependencyKeys"]} for name, n in nodes.items()}
        assert parents["curated_dataset"] == {"vendor_delivery"}
        assert parents["cv_models"] == {"curated_dataset"}
        assert parents["hand_checks"] == {"curated_dataset"}
        assert parents["label_issues"] == {"cv_models", "batch_scores", "hand_checks"}
        assert parents["vendor_scorecard"] == {"label_issues"}
        assert {"a.batch-001", "b.batch-001", "c.batch-001"} <= set(nodes["vendor_delivery"]["partitionKeys"])
        repository = data["workspaceOrError"]["locationEntries"][0]["locationOrLoadError"]["repositories"][0]
        assert {s["name"] for s in repository["sensors"]} == {"delivery_sensor", "scorecard_refresh_sensor",
                                                              "checks_sensor", "scorecard_automation"}
        assert repository["schedules"] == [{"name": "nightly_audit", "cronSchedule": "0 2 * * *"}]
    assert server.poll() is not None
    log = (tmp_path / "dagster.log").read_text()
    assert "superseded" not in log.lower() and "Serving dagster-webserver" in log  # dg dev: no deprecation warning


def test_screenshots_show_the_lineage_and_the_run_comparison(audited_home, tmp_path):
    from PIL import Image

    from pipelines.screenshots import take_screenshots

    lineage, comparison = take_screenshots(audited_home, tmp_path / "img", tmp_path / "logs")
    for png in (lineage, comparison):
        with Image.open(png) as image:
            assert image.size == (1600, 1000)
            assert len(set(image.convert("L").getdata())) > 20  # a rendered page, not a blank one


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_stops_dagster_and_all_its_processes_on_a_signal_to_the_cli(small_home, tmp_path, stop_signal):
    """`vendor-audit ui` starts `dagster dev` in a group of its own (webserver, daemon, code servers);
    a signal to the `vendor-audit` process alone must stop every process of that group."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cli = Path(sys.executable).with_name("vendor-audit")
    command = [str(cli), "ui", "--home", str(small_home), "--port", str(port)]
    groups: set[int] = set()
    with running(command, f"{base}/server_info", {}, tmp_path / "ui.log", timeout=180) as ui:
        try:
            descendants = psutil.Process(ui.pid).children(recursive=True)
            groups = {os.getpgid(p.pid) for p in descendants}
            assert groups and ui.pid not in groups  # dagster runs in its own group, apart from the CLI's
            assert any("dagster_webserver" in " ".join(p.cmdline()) for p in descendants)
            os.kill(ui.pid, stop_signal)  # the CLI alone, as a service manager or a terminal's Ctrl-C would
            assert ui.wait(timeout=60) == 128 + stop_signal
            _, alive = psutil.wait_procs(descendants, timeout=30)
            assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
            for pgid in groups:
                deadline = time.monotonic() + 30  # orphaned zombies wait for init to reap them
                while _group_exists(pgid) and time.monotonic() < deadline:
                    time.sleep(0.5)
                with pytest.raises(ProcessLookupError):
                    os.killpg(pgid, 0)
            with pytest.raises(OSError):  # nothing listens on the port any more
                LOCAL.open(f"{base}/server_info", timeout=5)
        finally:
            for pgid in groups:  # whatever a failure left behind
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False

