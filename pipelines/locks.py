"""Advisory file locks that serialise work on one home across processes (sensor runs, the CLI, the
schedule): a second holder waits, and says so in the log."""

from __future__ import annotations

import fcntl
import logging
import os
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
