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
  runs:
    max_concurrent_runs: 2  # the daemon's run queue: sensor and schedule runs beyond two wait their turn
  pools:
    default_limit: 1  # any pool without its own limit; 'dvc' and 'training' are set from pipelines/locks.py
python_logs:
  managed_python_loggers: [ml]
  python_log_level: INFO
"""
# runs, event log and schedules on PostgreSQL (dagster-postgres) instead of SQLite under DIR/dagster: the
# URL (POSTGRES_URL_FORM) is read from the environment variable, so that no password is written into the home
POSTGRES_URL_FORM = "postgresql+psycopg2://user:password@host:5432/database"
POSTGRES_STORAGE = """\
storage:
  postgres:
    postgres_url:
      env: {env}
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


def require_environment(postgres_url_env: str) -> None:
    """Stop with a clear error when ``postgres_url_env`` names an environment variable that is not set."""
    if not postgres_url_env:
        return
    url = os.environ.get(postgres_url_env, "")
    if not url:
        raise ValueError(f"the environment variable {postgres_url_env} is not set: it must hold the PostgreSQL URL "
                         f"of the home's Dagster storage ({POSTGRES_URL_FORM})")
    if not url.startswith(POSTGRES_URL_FORM.split("//")[0]):
        # SQLAlchemy 2.1 reads a bare postgresql:// with psycopg 3, which dagster-postgres does not support
        raise ValueError(f"the environment variable {postgres_url_env} must hold a URL of the form "
                         f"{POSTGRES_URL_FORM}: dagster-postgres talks to PostgreSQL through psycopg2")


def open_instance(home: Path, postgres_url_env: str = ""):
    """The home's Dagster instance, the one ``vendor-audit ui`` (dg dev) shows: as ``home/dagster/dagster.yaml``
    configures it, a file written on first use (SQLite storage under ``home/dagster``; with
    ``postgres_url_env``, PostgreSQL at the URL that environment variable holds)."""
    import dagster as dg

    from pipelines.locks import declare_pools

    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.is_file():
        require_environment(postgres_url_env)
        storage = POSTGRES_STORAGE.format(env=postgres_url_env) if postgres_url_env else ""
        config.write_text(DAGSTER_YAML + storage)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    declare_pools(instance)
    return instance
