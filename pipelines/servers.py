"""Start the real Dagster and MLflow servers on 127.0.0.1 and stop them by their process group."""

import errno
import json
import logging
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

log = logging.getLogger(__name__)


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
    return command, dagster_env(home)


def dagster_cli_command(home: Path, *words: str) -> tuple[list[str], dict]:
    """The ``dagster`` command line (``dagster sensor start NAME``, ...) on a home's instance and the
    project's workspace.yaml: the environment ``vendor-audit ui`` sets, so both see the same sensors."""
    command = [str(Path(sys.executable).with_name("dagster")), *words, "-w", str(WORKSPACE)]
    return command, dagster_env(home)


def dagster_env(home: Path) -> dict:
    """The variables that point Dagster's command lines at a home: the home the definitions read
    (``VENDOR_AUDIT_HOME``) and its instance (``DAGSTER_HOME``)."""
    return {"VENDOR_AUDIT_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")}


class PortUnavailable(ValueError):
    """A server's address cannot be listened on (in use, not this machine's, not allowed): a usage error."""


class ServerExited(RuntimeError):
    """A server stopped on its own, without being asked to by a signal."""


def check_port_free(host: str, port: int) -> None:
    """Raise :class:`PortUnavailable` unless a server could listen on ``host:port`` now.

    Servers such as uvicorn report a failed bind in their log and may still exit with status 0, so
    the address is tried before one is started.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise PortUnavailable(f"cannot listen on {host}: {exc.strerror}: choose another with --host") from exc
    with socket.socket(family, kind, proto) as probe:
        # as the servers do: a port whose last connections are in TIME_WAIT is free to listen on
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortUnavailable(f"port {port} on {host} is in use (another server?): "
                                      "choose another with --port N") from exc
            raise PortUnavailable(f"cannot listen on port {port} on {host} ({exc.strerror}): "
                                  "choose another with --host or --port N") from exc


def signal_group(pgid: int, signum: int) -> bool:
    """Send ``signum`` to process group ``pgid``; False when the group has no process left."""
    try:
        os.killpg(pgid, signum)
        return True
    except ProcessLookupError:
        return False


def stop_group(process: subprocess.Popen, grace: float = 20.0, signum: int = signal.SIGTERM) -> None:
    """Stop a child started with ``start_new_session=True`` and every process of its group: ``signum``
    (0: none, when the group has had its signal), then SIGKILL to whatever of the group is left after
    ``grace`` seconds (also once the child itself has exited: its children must not outlive it). The
    child is reaped."""
    deadline = time.monotonic() + grace
    signal_group(process.pid, signum)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    while process.returncode is not None and signal_group(process.pid, 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    signal_group(process.pid, signal.SIGKILL)
    process.wait()


# a closed terminal (SIGHUP) stops the server too, gracefully: its group is in a session of its own
# and would otherwise outlive the command
FORWARDED_SIGNALS = {signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGINT, signal.SIGHUP: signal.SIGTERM}


def supervise(command: list[str], env: dict, name: str, grace: float = 20.0) -> int:
    """Run a server until this process gets SIGTERM, SIGINT or SIGHUP, and stop all of it then.

    The server runs in a session of its own, so that its whole process group (a server's workers,
    daemons, code servers) can be stopped as one: a signal to this process is forwarded to the group;
    whatever is left of the group ``grace`` seconds later is killed.

    Parameters
    ----------
    command, env
        The server's command line and the variables added to this process's environment.
    name
        The server's name in messages, e.g. ``mlflow server``.
    grace
        Seconds the group has to stop after a signal before SIGKILL.

    Returns
    -------
    int
        128 + the signal that stopped it (the shell's convention: 143 for SIGTERM, 130 for Ctrl-C).

    Raises
    ------
    ServerExited
        When the server exits without being asked to, whatever its status (uvicorn exits 0 when it
        could not bind); any process it left in its group is stopped first.
    """
    started: list[subprocess.Popen] = []
    received: list[tuple[int, float]] = []  # (signal, when)

    def forward(signum, _frame) -> None:
        received.append((signum, time.monotonic()))
        if started:
            signal_group(started[0].pid, FORWARDED_SIGNALS[signum])

    # handlers first, so a signal that arrives while the server starts is forwarded too
    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED_SIGNALS}
    try:
        # its own session: the terminal's Ctrl-C reaches it only through `forward`, and the group is
        # stopped as one
        started.append(subprocess.Popen(command, env={**os.environ, **env}, start_new_session=True))
        process = started[0]
        if received:  # a signal arrived while the server was starting
            signal_group(process.pid, FORWARDED_SIGNALS[received[-1][0]])
        while process.poll() is None and not (received and time.monotonic() > received[0][1] + grace):
            try:
                process.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        if process.returncode is None:
            log.warning("%s did not stop within %.0f s of the signal: killing its process group", name, grace)
            signal_group(process.pid, signal.SIGKILL)
        # whatever the server left running in its group: after a signal they have it already
        stop_group(process, grace, signum=0 if received else signal.SIGTERM)
    finally:
        if started and started[0].returncode is None:  # an unexpected error here: leave nothing running
            stop_group(started[0], grace=0, signum=signal.SIGKILL)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        return 128 + received[0][0]
    status = (f"status {process.returncode}" if process.returncode >= 0
              else f"signal {signal.Signals(-process.returncode).name}")
    raise ServerExited(f"{name} exited on its own ({status}) before it was asked to stop: see its output above")


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
