"""A vendor-audit home on disk: where it is, whether it is one, and its Dagster instance."""

from __future__ import annotations

import os
from pathlib import Path

DAGSTER_YAML = """\
telemetry:
  enabled: false
nux:
  enabled: false  # the UI's "join the community" pop-up, which loads a page from the internet
concurrency:
  pools:
    default_limit: 1  # any pool without its own limit; 'dvc' and 'training' are set from pipelines/locks.py
python_logs:
  managed_python_loggers: [ml]
  python_log_level: INFO
"""


def default_home() -> Path:
    return Path(os.environ.get("VENDOR_AUDIT_HOME") or Path.cwd() / "home")


def require_home(home: Path, settings_file: bool = False) -> None:
    """Stop with a usage error (exit 2) naming the commands that create a home, when ``home`` is not a
    folder, or, with ``settings_file``, has no settings file; nothing is created."""
    from ml.config import CONFIG_NAME

    create = (f"create one with vendor-audit init --home {home} --classes NAME,NAME,... (for your deliveries), "
              f"vendor-audit simulate --home {home} (simulated deliveries) or vendor-audit demo --home {home} "
              f"(simulate and audit)")
    if not home.is_dir():
        raise ValueError(f"{home}: no such vendor-audit home: {create}")
    if settings_file and not (home / CONFIG_NAME).is_file():
        raise ValueError(f"{home} is not a vendor-audit home (no {CONFIG_NAME}): {create}")


def open_instance(home: Path):
    """The home's Dagster instance (SQLite storage under ``home/dagster``), the one ``vendor-audit ui`` (dg dev) shows."""
    import dagster as dg

    from pipelines.locks import declare_pools

    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.is_file():
        config.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    declare_pools(instance)
    return instance
