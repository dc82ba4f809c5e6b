"""The command line's log lines on stderr: the handler every command and Dagster run prints through."""

from __future__ import annotations

import logging
import sys


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each line (tests and tools replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def console_logging(*names: str, level: int = logging.INFO) -> None:
    """Log these loggers' lines from ``level`` on to stderr, once per process, and not again through
    the root logger (which some libraries configure). ml's own lines reach the console through
    Dagster's managed loggers during runs."""
    for name in names:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if any(getattr(h, "vendor_audit", False) for h in logger.handlers):
            continue
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.vendor_audit = True
        logger.addHandler(handler)
        logger.propagate = False
