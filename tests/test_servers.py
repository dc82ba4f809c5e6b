"""The real MLflow and Dagster servers, on 127.0.0.1, show what the audit recorded."""

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from ml.config import CONFIG_NAME
from pipelines.cli import main
from pipelines.servers import (
    LOCAL, ServerExited, check_port_free, dagster_dev_command, free_port, http_json, mlflow_server_command, running,
    supervise,
)


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

    lineage, comparison = take_screenshots(audited_home, tmp_path / "img", tmp_path / "logs")  # one audit: no trends
    for png in (lineage, comparison):
        with Image.open(png) as image:
            assert image.size == (1600, 1000)
            assert len(set(image.convert("L").getdata())) > 20  # a rendered page, not a blank one


CLI = Path(sys.executable).with_name("vendor-audit")


def _stop_the_cli_by_signal(command: list[str], ready_url: str, log_path: Path, stop_signal: int,
                            server_marker: str) -> None:
    """Start the CLI ``command``, wait until ``ready_url`` answers, send ``stop_signal`` to the CLI's
    process alone (as a service manager, a closed terminal or a terminal's Ctrl-C would), and check
    that every process it started has gone and nothing listens on the port any more."""
    port = int(ready_url.split(":")[2].split("/")[0])
    groups: set[int] = set()
    with running(command, ready_url, {}, log_path, timeout=180) as cli:
        try:
            descendants = psutil.Process(cli.pid).children(recursive=True)
            groups = {os.getpgid(p.pid) for p in descendants}
            assert any(server_marker in " ".join(p.cmdline()) for p in descendants)
            os.kill(cli.pid, stop_signal)
            status = cli.wait(timeout=60)
            _, alive = psutil.wait_procs(descendants, timeout=30)
            assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
            for pgid in groups:
                deadline = time.monotonic() + 30  # orphaned zombies wait for init to reap them
                while _group_exists(pgid) and time.monotonic() < deadline:
                    time.sleep(0.5)
                with pytest.raises(ProcessLookupError):
                    os.killpg(pgid, 0)
            with pytest.raises(OSError):  # nothing answers on the port any more
                LOCAL.open(ready_url, timeout=5)
            check_port_free("127.0.0.1", port)  # and a new server could listen there
            # the shell's convention for a command stopped by a signal
            assert status == 128 + stop_signal
            assert cli.pid not in groups  # the server ran in a group of its own, apart from the CLI's
        finally:
            for pgid in groups:  # whatever a failure left behind
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_ui_stops_dagster_and_all_its_processes_on_a_signal_to_the_cli(small_home, tmp_path, stop_signal):
    """`vendor-audit ui` starts `dg dev` in a group of its own (webserver, daemon, code servers); a
    signal to the `vendor-audit` process alone must stop every process of that group."""
    port = free_port()
    _stop_the_cli_by_signal([str(CLI), "ui", "--home", str(small_home), "--port", str(port)],
                            f"http://127.0.0.1:{port}/server_info", tmp_path / "ui.log", stop_signal,
                            "dagster_webserver")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_mlflow_ui_stops_the_server_and_its_workers_on_a_signal_to_the_cli(tmp_path, stop_signal):
    """`mlflow server` runs its web server (uvicorn) as a child process: stopping `vendor-audit mlflow-ui`
    by its pid must not leave that child listening on the port."""
    home = tmp_path / "home"
    home.mkdir()  # mlflow-ui needs only the folder: the server creates its tracking store
    port = free_port()
    _stop_the_cli_by_signal([str(CLI), "mlflow-ui", "--home", str(home), "--port", str(port)],
                            f"http://127.0.0.1:{port}/health", tmp_path / "mlflow-ui.log", stop_signal, "uvicorn")


@pytest.mark.parametrize("command", ["mlflow-ui", "ui"])
def test_a_port_in_use_stops_the_command_with_one_line_naming_the_port(command, tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / CONFIG_NAME).write_text("classes: [cat, dog]\n")  # the least that ui accepts as a home
    with socket.socket() as other_server:
        other_server.bind(("127.0.0.1", 0))
        other_server.listen()
        port = other_server.getsockname()[1]
        assert main([command, "--home", str(home), "--port", str(port)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"vendor-audit: error: port {port} on 127.0.0.1 is in use (another server?): choose another with --port N"]
    assert sorted(p.name for p in home.iterdir()) == [CONFIG_NAME]  # no server started: no store, no instance


def test_a_server_that_exits_on_its_own_is_an_error_even_with_status_0(tmp_path):
    """uvicorn logs `[Errno 98] address already in use` and exits 0: the port taken after the CLI's
    own check, say. That must not pass for a server that ran and was stopped."""
    with socket.socket() as other_server:
        other_server.bind(("127.0.0.1", 0))
        other_server.listen()
        command, env = mlflow_server_command(tmp_path, other_server.getsockname()[1])
        with pytest.raises(ServerExited, match=r"^mlflow server exited on its own \(status 0\) before it was asked"):
            supervise(command, env, "mlflow server")


def test_a_closed_terminal_stops_the_server_and_its_children(tmp_path):
    """SIGHUP (the terminal closed) would end the supervising process alone: the server's group is in a
    session of its own and gets no hangup. It is stopped with SIGTERM instead."""
    pid_file = tmp_path / "child.pid"
    command = ["sh", "-c", f"sleep 300 & echo $! > {pid_file}; wait"]
    hangup = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGHUP))
    hangup.start()
    try:
        assert supervise(command, {}, "sh") == 128 + signal.SIGHUP
    finally:
        hangup.cancel()
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_processes_a_server_leaves_behind_when_it_exits_are_stopped(tmp_path):
    pid_file = tmp_path / "child.pid"
    command = ["sh", "-c", f"sleep 300 & echo $! > {pid_file}; exit 3"]
    with pytest.raises(ServerExited, match=r"\(status 3\)"):
        supervise(command, {}, "sh")
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False

