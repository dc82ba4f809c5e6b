"""A home's own MLflow tracking store: SQLite in ``<home>/mlflow/mlflow.db``, artifacts under
``<home>/mlflow/artifacts``, kept inside the home wherever the home is moved or copied.

MLflow records absolute artifact locations in its tables (each experiment's, each run's, each logged
model's and registered version's), and has no API to change them. A home that was moved, or a copy of
one, would read and write the artifacts of the place it was made in. So whenever the store is opened,
before any run, the locations recorded under the home it was made in are re-pointed to the same places
under the home it is in now (:func:`open_home_store`).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from contextlib import closing
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

log = logging.getLogger(__name__)

# (table, column) holding a location: a file URI or a plain path in a local store
LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("logged_models", "artifact_location"), ("model_versions", "storage_location"),
                    ("model_versions", "source"))
DEFAULT_EXPERIMENT_ID = 0  # MLflow's "Default" experiment, which every store has


def store_file(home: Path) -> Path:
    """The SQLite file of the home's tracking store."""
    return Path(home).resolve() / "mlflow" / "mlflow.db"


def artifact_root(home: Path) -> Path:
    """The folder every artifact of the home's store lies in (the experiment's, each run's, each model's)."""
    return Path(home).resolve() / "mlflow" / "artifacts"


def store_uri(home: Path) -> str:
    """The tracking (and registry) URI of the home's store."""
    return f"sqlite:///{store_file(home)}"


def open_home_store(home: Path) -> str:
    """Make the home's tracking store ready for use and return its URI.

    A missing store is created with its default artifact root under the home: the Default experiment
    (id 0), which MLflow makes with ``./mlruns/0`` of the current directory otherwise, gets
    ``<home>/mlflow/artifacts/0``. An existing store made in another place (the home was moved or
    copied) has every location recorded under that place re-pointed to this home, in one transaction,
    logged at INFO; so has a Default experiment whose location lies outside the home.

    Parameters
    ----------
    home
        The home folder.

    Returns
    -------
    str
        The ``sqlite:///`` URI of the store.
    """
    database = store_file(home)
    database.parent.mkdir(parents=True, exist_ok=True)
    if not database.is_file():
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        SqlAlchemyStore(store_uri(home), artifact_root(home).as_uri()).engine.dispose()
    else:
        _repoint(database, Path(home).resolve())
    return store_uri(home)


def forget_cached_artifact_places() -> None:
    """Drop MLflow's per-process cache of artifact repositories.

    MLflow caches each run's (and logged model's) artifact repository by its id alone, for the whole
    process. A copied home has the same run ids as its original, so in a process that has worked on
    both, an entry cached from one would send the other's artifacts there.
    """
    from mlflow.tracking._tracking_service import utils

    utils._artifact_repos_cache.clear()


def _local_path(location: str | None) -> Path | None:
    """The local path a stored location names (a ``file:`` URI or an absolute path); None for others."""
    if not location:
        return None
    parsed = urlparse(location)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(url2pathname(parsed.path))
    return Path(location) if location.startswith("/") else None


def _homes_recorded(db: sqlite3.Connection) -> set[Path]:
    """The homes the store's experiments place their artifacts in: ``<home>/mlflow/artifacts`` (the
    project's experiment) or ``<home>/mlflow/artifacts/<id>`` (the Default experiment)."""
    homes = set()
    for (location,) in db.execute("SELECT artifact_location FROM experiments"):
        path = _local_path(location)
        for folder in (path, path.parent) if path else ():
            if folder.name == "artifacts" and folder.parent.name == "mlflow":
                homes.add(folder.parent.parent)
    return homes


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in db.execute(f"PRAGMA table_info('{table}')")}


def _under(old: str, new: str, value: str) -> str | None:
    """``value`` with the prefix ``old`` replaced by ``new`` when it is ``old`` or below it; else None."""
    if value == old or value.startswith(old.rstrip("/") + "/"):
        return new + value[len(old):]
    return None


def _repoint_from(db: sqlite3.Connection, old_home: Path, new_home: Path) -> int:
    """Re-point every location recorded under ``old_home`` to the same place under ``new_home``;
    returns the number of values changed."""
    changed = 0
    # the same place written as a URI (artifact locations) and as a plain path (a dataset's source)
    prefixes = [(old_home.as_uri(), new_home.as_uri()), (str(old_home), str(new_home))]
    for table, column in LOCATION_COLUMNS:
        if column not in _columns(db, table):  # a store made by an older MLflow
            continue
        for old, new in prefixes:
            changed += db.execute(
                f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                f"WHERE {column} = ? OR substr({column}, 1, ?) = ?",
                (new, len(old) + 1, old, len(old) + 1, old + "/")).rowcount
    if "dataset_source" in _columns(db, "datasets"):  # the DVC remote a run's dataset came from
        for rowid, text in db.execute("SELECT rowid, dataset_source FROM datasets").fetchall():
            try:
                source = json.loads(text)
            except (TypeError, ValueError):
                continue
            uri = source.get("uri") if isinstance(source, dict) else None
            moved = next((m for old, new in prefixes if isinstance(uri, str) and (m := _under(old, new, uri))), None)
            if moved is not None:
                db.execute("UPDATE datasets SET dataset_source = ? WHERE rowid = ?",
                           (json.dumps({**source, "uri": moved}), rowid))
                changed += 1
    return changed


def _default_outside(db: sqlite3.Connection, home: Path) -> str | None:
    """The Default experiment's location when it lies outside the home's artifact folder; else None."""
    row = db.execute("SELECT artifact_location FROM experiments WHERE experiment_id = ?",
                     (DEFAULT_EXPERIMENT_ID,)).fetchone()
    if row is None:
        return None
    path = _local_path(row[0])
    return None if path is not None and path.is_relative_to(artifact_root(home)) else row[0]


def _repoint(database: Path, home: Path) -> None:
    """Re-point the store to ``home`` when it was made elsewhere, in one write transaction; nothing
    is written when it is in place already."""
    with closing(sqlite3.connect(database, timeout=60, isolation_level=None)) as db:
        if not (_homes_recorded(db) - {home}) and _default_outside(db, home) is None:
            return
        db.execute("BEGIN IMMEDIATE")  # checked again under the write lock: another process may have done it
        try:
            for old_home in sorted(_homes_recorded(db) - {home}):
                changed = _repoint_from(db, old_home, home)
                log.info("the MLflow store %s was made in %s (the home was moved or copied): %d stored "
                         "locations re-pointed to %s", database, old_home, changed, home)
            default = _default_outside(db, home)
            if default is not None:
                location = (artifact_root(home) / str(DEFAULT_EXPERIMENT_ID)).as_uri()
                db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                           (location, DEFAULT_EXPERIMENT_ID))
                log.info("the MLflow store's Default experiment put its artifacts in %s, outside the home: "
                         "now %s", default, location)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
