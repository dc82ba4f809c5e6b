"""Start the real Dagster and MLflow servers on 127.0.0.1 and stop them by their process group."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from pipelines.mlflow_store import artifact_root, open_home_store

WORKSPACE = Path(__file__).resolve().parent.parent / "workspace.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# the servers started here listen on this machine: never through a proxy from the environment
# (urllib's default opener keeps the proxies it first saw, even after the environment changes)
LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_json(url: str, payload: dict | None = None, timeout: float = 10.0) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with LOCAL.open(request, timeout=timeout) as response:
        return json.loads(response.read())


# The MLflow UI's sidebar switch (GenAI | Model training) starts on GenAI whatever the experiment's
# kind; this query parameter of a page's address opens it on model training.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def mlflow_server_command(home: Path, port: int, host: str = "127.0.0.1") -> tuple[list[str], dict]:
    """``mlflow server`` on a home's tracking store, with the settings that make it answer in seconds.
    The store is made ready first: re-pointed to the home when the home was moved or copied."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", open_home_store(home),
               "--default-artifact-root", artifact_root(home).as_uri(), "--host", host, "--port", str(port),
               "--workers", "1"]
    return command, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}


def dagster_dev_command(home: Path, port: int, host: str = "127.0.0.1") -> tuple[list[str], dict]:
    """``dg dev`` (webserver, daemon and code server; the entry point that supersedes ``dagster dev``)
    with the project's workspace.yaml, on a home's Dagster instance."""
    dg_cli = Path(sys.executable).with_name("dg")
    launcher = [str(dg_cli)] if dg_cli.is_file() else [sys.executable, "-c", "from dagster_dg_cli.cli import main; main()"]
    command = [*launcher, "dev", "-w", str(WORKSPACE), "-h", host, "-p", str(port)]
    return command, {"VENDOR_AUDIT_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}


def stop_group(process: subprocess.Popen, grace: float = 20.0) -> None:
    """Stop a child started with ``start_new_session=True`` and every process of its group: SIGTERM,
    then SIGKILL after ``grace`` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:  # the whole group has exited already
        process.wait()


@contextmanager
def running(command: list[str], ready_url: str, env: dict, log_path, timeout: float = 120.0):
    """Run ``command`` in its own session until ``ready_url`` answers; stop the whole group after."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{command[:4]} exited with {process.returncode}: see {log_path}")
                try:
                    LOCAL.open(ready_url, timeout=2).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{ready_url} did not answer in {timeout:.0f} s: see {log_path}")
                    time.sleep(0.5)
            yield process
        finally:
            stop_group(process)
