"""Serialised work on one home: the file lock itself, and DVC operations from concurrent callers."""

import logging
import subprocess
import sys
import threading
import time

from pipelines.locks import exclusive
from pipelines.resources import AuditHome, DvcRepo
from conftest import make_home

HOLD = """
import sys, time
from pathlib import Path
from pipelines.locks import exclusive
with exclusive(Path(sys.argv[1]), "test"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_a_second_holder_waits_for_the_first_and_says_so(tmp_path, caplog):
    path = tmp_path / ".locks" / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path), "1.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        logger = logging.getLogger("pipelines.locks")
        logger.addHandler(caplog.handler)  # the CLI stops its loggers from propagating to the root
        with caplog.at_level("INFO", logger="pipelines.locks"), exclusive(path, "the test resource"):
            waited = time.monotonic() - started
            assert f"pid {holder.pid}" in caplog.text and "waiting for the test resource" in caplog.text
    finally:
        logger.removeHandler(caplog.handler)
        holder.wait(timeout=30)
    assert waited > 0.5


def test_a_killed_holder_releases_the_lock(tmp_path):
    path = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path), "60"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait(timeout=30)
    started = time.monotonic()
    with exclusive(path, "the test resource"):
        assert time.monotonic() - started < 5


def test_concurrent_dvc_snapshots_of_one_repository_both_succeed(tmp_path):
    """DVC's own repository lock fails a second command at once; ours makes it wait instead."""
    home = make_home(tmp_path / "home", {"a": 0.0}, per_vendor=40)
    (home / "curated").mkdir()
    (home / "other").mkdir()
    for folder in ("curated", "other"):
        (home / folder / "rows.csv").write_text(f"{folder}\n" * 1000)
    dvc = DvcRepo(audit_home=AuditHome(home=str(home)))
    results, errors = {}, []

    def snapshot(folder: str) -> None:
        try:
            results[folder] = dvc.snapshot(folder)
        except Exception as error:  # collected for the assertion below
            errors.append(error)

    threads = [threading.Thread(target=snapshot, args=(f,)) for f in ("curated", "other")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert set(results) == {"curated", "other"} and all(v.endswith(".dir") for v in results.values())
    assert (home / "curated.dvc").is_file() and (home / "other.dvc").is_file()
