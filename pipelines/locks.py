"""What serialises work on one home: advisory file locks across processes (sensor runs, the CLI, the
schedule: a second holder waits, and says so in the log), and the Dagster pools that limit how many
steps of a kind run at once in the whole deployment."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


@contextmanager
def exclusive(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block; ``what`` names the guarded work in logs.

    The lock belongs to the open file, so the operating system releases it when a holder dies, even
    by SIGKILL. Not re-entrant: a process must not take the same lock twice.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            log.info("waiting for %s: %s holds %s", what, holder, path)
            started = time.monotonic()
            fcntl.flock(handle, fcntl.LOCK_EX)
            log.info("got %s after %.1f s", what, time.monotonic() - started)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)


# Dagster pools (the assets name them with ``pool=``) and their limits, set on the instance by
# :func:`declare_pools`: DVC runs one operation at a time per repository; one training saturates the
# machine (or its one GPU).
DVC_POOL = "dvc"
TRAINING_POOL = "training"
POOL_LIMITS = {DVC_POOL: 1, TRAINING_POOL: 1}


def declare_pools(instance) -> None:
    """Give each pool of :data:`POOL_LIMITS` its limit on a Dagster instance (kept where it is already set)."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    current = {limit.name: limit.limit for limit in storage.get_pool_limits()}
    for pool, limit in POOL_LIMITS.items():
        if current.get(pool) != limit:
            storage.set_concurrency_slots(pool, limit)


# A run executed in-process carries the host and pid of the process executing it: when that process
# is killed, the run stays "started" and keeps its pool slots, and the next run would wait forever.
PROCESS_TAG = "vendor-audit/process"


def process_tags() -> dict[str, str]:
    """Tags naming this process, for a run it executes in-process."""
    return {PROCESS_TAG: f"{socket.gethostname()}:{os.getpid()}"}


def release_abandoned_runs(instance) -> list[str]:
    """Mark failed, and free the pool slots of, runs on ``instance`` still "started" whose executing
    process on this host is gone; returns their run ids."""
    import dagster as dg

    host = socket.gethostname()
    released = []
    unfinished = dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING])
    for run in instance.get_runs(filters=unfinished):
        owner_host, _, pid = run.tags.get(PROCESS_TAG, "").rpartition(":")
        if owner_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        instance.report_run_failed(run, f"the process that executed it (pid {pid}) ended before the run did")
        if instance.event_log_storage.supports_global_concurrency_limits:
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        log.warning("run %s was left unfinished by pid %s, which has ended: marked failed, its pool slots freed",
                    run.run_id, pid)
        released.append(run.run_id)
    return released


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
