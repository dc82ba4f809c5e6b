"""A real PostgreSQL server for tests: a throwaway cluster (initdb) on 127.0.0.1 and a free port,
started as its own process and stopped by its pid. Debian's ``postgresql`` package puts the server's
programs under /usr/lib/postgresql/<major>/bin, off the PATH. PostgreSQL refuses to run as root: as
root, the cluster belongs to the package's ``postgres`` user and its programs run as that user."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pipelines.servers import free_port


def server_programs() -> Path | None:
    """The folder of initdb and postgres: on the PATH, else the newest Debian major version."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _as_server_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextmanager
def postgres_server(database: str = "vendor_audit") -> Iterator[tuple[str, int]]:
    """Start a new cluster, create ``database``, and yield ``(url, pid)``; stop the server on exit."""
    programs = server_programs()
    if programs is None:
        raise FileNotFoundError("PostgreSQL's initdb not found: apt-get install postgresql")
    # under /tmp itself: the server's user must reach the folder, and pytest's own folders are root's alone
    root = Path(tempfile.mkdtemp(prefix="va-postgres-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (root, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
    port = free_port()
    subprocess.run(_as_server_user([str(programs / "initdb"), "-D", str(data), "-U", "vendor_audit",
                                    "--auth=trust", "-E", "UTF8", "--no-instructions"]),
                   check=True, capture_output=True, text=True)
    server = subprocess.Popen(_as_server_user([str(programs / "postgres"), "-D", str(data), "-p", str(port),
                                               "-h", "127.0.0.1", "-k", str(sockets)]),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([str(programs / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                             capture_output=True).returncode != 0:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.3)
        subprocess.run([str(programs / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "vendor_audit",
                        database], check=True, capture_output=True)
        yield f"postgresql+psycopg2://vendor_audit@127.0.0.1:{port}/{database}", server.pid
    finally:
        # SIGINT: PostgreSQL's fast shutdown (runuser passes it on to the server)
        os.killpg(server.pid, signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        shutil.rmtree(root, ignore_errors=True)
