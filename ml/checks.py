"""Hand-check answers and gold (honeypot) images: reading and validating the files people fill in.

Answers are ``DIR/checks/<name>.csv`` (``image_id, true_labels``, optional ``checker, checked_at``), or
the exports of the tools checkers work in, dropped in the same folder as they come: Label Studio's
JSON export (``<name>.json``, :mod:`ml.labelstudio`) and CVAT's "CVAT for images 1.1" XML
(``<name>.xml``, :mod:`ml.cvat`); gold is ``DIR/gold/<name>.csv`` (``sha256`` of the image file, ``true_labels``). ``true_labels`` is
one class name, or several joined by ``|`` when the image truly shows more than one (a plausible
set): a given label inside the set is correct, outside it an error.

Like deliveries, every data row ends either accepted or quarantined with its reason; a file that
cannot be read as a whole is quarantined as one row (``row`` 0) whose reason names the file.
Files are read in file-name order, and the first answer for an image (or a gold digest) is kept.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ml.delivery import DeliveryError, read_csv_columns
from ml.files import atomic_write_csv

CHECK_COLUMNS = ["image_id", "true_labels", "checker", "checked_at", "file", "row"]
GOLD_COLUMNS = ["sha256", "true_labels", "file", "row"]
CHECK_QUARANTINE_COLUMNS = ["file", "row", "key", "true_labels", "reason"]
LABEL_SEPARATOR = "|"
QUARANTINE_KINDS = ("checks", "gold")
CHECK_SUFFIXES = (".csv", ".json", ".xml")  # CSV, Label Studio's JSON export, CVAT for images XML
GOLD_SUFFIXES = (".csv",)
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _class_lookup(classes: tuple[str, ...]) -> dict[str, tuple[int, str]]:
    """Folded class name -> (position in the taxonomy, the taxonomy's spelling)."""
    joined = [name for name in classes if LABEL_SEPARATOR in name]
    if joined:
        # a class containing the separator could never be named in an answer: a settings problem
        raise ValueError(f"class name(s) {joined} contain {LABEL_SEPARATOR!r}, which separates the classes "
                         f"of a hand-check answer; rename them in the settings")
    return {name.strip().casefold(): (position, name) for position, name in enumerate(classes)}


def _parse_label_set(text: str, lookup: dict[str, tuple[int, str]]) -> str:
    names = [part.strip() for part in text.split(LABEL_SEPARATOR)]
    if not any(names):
        raise ValueError("empty answer")
    if not all(names):
        raise ValueError(f"empty class name in {text.strip()!r}")
    unknown = list(dict.fromkeys(name for name in names if name.casefold() not in lookup))
    if unknown:
        raise ValueError(f"unknown class{'es' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}")
    found = sorted({lookup[name.casefold()] for name in names})
    return LABEL_SEPARATOR.join(name for _, name in found)


def parse_label_set(text: str, classes: tuple[str, ...]) -> str:
    """The canonical form of an answer: its classes in taxonomy order, joined by ``|``, no repeats.

    Class names match ``classes`` ignoring surrounding spaces and letter case and are stored in the
    taxonomy's spelling: with classes ``("cat", "dog")``, ``" Dog | cat|DOG"`` gives ``"cat|dog"``.

    Raises
    ------
    ValueError
        With the reason: ``empty answer``, ``empty class name in 'cat|'``, ``unknown class 'x'``
        (``unknown classes 'x', 'y'`` for several). Also when a class name in ``classes`` itself
        contains ``|``.
    """
    return _parse_label_set(text, _class_lookup(classes))


def answer_files(folder: Path, suffixes: tuple[str, ...] = CHECK_SUFFIXES) -> list[Path]:
    """The answer files in ``folder`` (those with one of ``suffixes``), in file-name order."""
    if not folder.is_dir():
        return []
    return sorted((path for path in folder.iterdir() if path.suffix.lower() in suffixes and not path.is_dir()),
                  key=lambda path: path.name)


def read_file_rows(path: Path, key_column: str, optional: tuple[str, ...],
                   image_ids=()) -> tuple[list[dict], list[dict]]:
    """The rows of one answer file before validation: ``(rows, quarantined)``.

    ``rows`` are dicts of ``key_column``, ``true_labels``, ``optional`` and ``row``, as written;
    ``quarantined`` the rows the file's own format already rejects (a Label Studio task skipped or
    not answered, a CVAT image with no tag), with ``row``, ``key``, ``true_labels`` and ``reason``.
    Raises DeliveryError when the file cannot be read as a whole.
    """
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return read_csv_columns(path, (key_column, "true_labels"), optional).to_dict("records"), []
    from ml import cvat, labelstudio

    return labelstudio.read_export(path) if suffix == ".json" else cvat.read_export(path, image_ids)


def _read_answers(folder: Path, key_column: str, optional: tuple[str, ...], check_key,
                  classes: tuple[str, ...], suffixes: tuple[str, ...], image_ids=()) -> tuple[list[dict], list[dict]]:
    """Shared by :func:`read_checks` and :func:`read_gold`: validate every row of every answer file.

    ``check_key(raw) -> key`` returns the normalised key of a row or raises ValueError with the reason.
    Returns the accepted records (``key_column``, ``true_labels``, ``optional``, ``file``, ``row``)
    and the quarantined ones (CHECK_QUARANTINE_COLUMNS).
    """
    lookup = _class_lookup(classes)
    accepted, quarantined = [], []
    first_answer: dict[str, tuple[str, int, str]] = {}  # key -> (file, row, canonical set)
    for path in answer_files(folder, suffixes):
        try:
            records, rejected = read_file_rows(path, key_column, optional, image_ids)
        except DeliveryError as exc:  # unusable as a whole: one row, the reason names the file
            quarantined.append({"file": path.name, "row": 0, "key": "", "true_labels": "", "reason": str(exc)})
            continue
        quarantined.extend({"file": path.name, **record} for record in rejected)
        for record in records:
            raw_key, raw_labels = record[key_column], record["true_labels"]
            try:
                key = check_key(raw_key)
                labels = _parse_label_set(raw_labels, lookup)
                if key in first_answer:
                    first_file, first_row, first_labels = first_answer[key]
                    raise ValueError(f"already checked in {first_file} row {first_row}" if labels == first_labels
                                     else f"checked again in {first_file} row {first_row} with another answer "
                                          f"({first_labels})")
            except ValueError as exc:
                quarantined.append({"file": path.name, "row": record["row"], "key": raw_key,
                                    "true_labels": raw_labels, "reason": str(exc)})
                continue
            first_answer[key] = (path.name, record["row"], labels)
            accepted.append({key_column: key, "true_labels": labels,
                             **{column: str(record[column]).strip() for column in optional},
                             "file": path.name, "row": record["row"]})
    return accepted, quarantined


def _frame(records: list[dict], columns: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(records, columns=columns)
    return frame.astype({"row": np.int64})


def read_checks(folder: Path, classes: tuple[str, ...],
                image_ids: set[str] | pd.Index) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read and validate every hand-check answer file in ``folder`` (``*.csv``, Label Studio ``*.json``,
    CVAT ``*.xml``), in file-name order.

    A row is quarantined for an empty or unknown image id (ids match ``image_ids`` exactly, after
    surrounding spaces are removed), an empty answer or unknown class (see :func:`parse_label_set`),
    or an image answered before, in this file or an earlier one: ``already checked in <file> row N``
    when the answer is the same set, ``checked again in <file> row N with another answer (<set>)``
    when it differs (``<file> row N`` and ``<set>``: the first answer, which is kept). A file that
    is not readable as a whole (not UTF-8, not CSV, no ``image_id`` or ``true_labels`` column) is
    quarantined as one row with ``row`` 0 and the reason naming the file and line.

    Returns
    -------
    accepted : DataFrame (A, 6)
        CHECK_COLUMNS: ``image_id`` and ``checker``, ``checked_at`` stripped ("" where the file has
        no such column), ``true_labels`` canonical, ``file`` the answer file's name, ``row`` its
        1-based data row.
    quarantine : DataFrame (Q, 5)
        CHECK_QUARANTINE_COLUMNS: ``key`` and ``true_labels`` as written, and the ``reason``.

    Every non-blank data row of every readable file is in exactly one of the two; both are empty
    when ``folder`` does not exist.
    """
    def check_id(raw: str) -> str:
        image_id = raw.strip()
        if not image_id:
            raise ValueError("empty image id")
        if image_id not in image_ids:
            raise ValueError(f"unknown image id {image_id!r}")
        return image_id

    accepted, quarantined = _read_answers(folder, "image_id", ("checker", "checked_at"), check_id, classes,
                                          CHECK_SUFFIXES, image_ids)
    return _frame(accepted, CHECK_COLUMNS), _frame(quarantined, CHECK_QUARANTINE_COLUMNS)


def read_gold(folder: Path, classes: tuple[str, ...]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read and validate every gold file ``folder/*.csv``, in file-name order.

    ``sha256`` is the SHA-256 of an image file, 64 hexadecimal characters in either case (stored in
    lower case). A row is quarantined for an empty or malformed digest, an empty answer or unknown
    class, or a digest given before (same rule and reasons as :func:`read_checks`); a file unusable
    as a whole is quarantined as one row with ``row`` 0.

    Returns
    -------
    accepted : DataFrame (A, 4)
        GOLD_COLUMNS: ``sha256`` lower case, ``true_labels`` canonical, ``file``, ``row``.
    quarantine : DataFrame (Q, 5)
        CHECK_QUARANTINE_COLUMNS, ``key`` the digest as written.
    """
    def check_digest(raw: str) -> str:
        digest = raw.strip().lower()
        if not digest:
            raise ValueError("empty sha256")
        if not SHA256_RE.match(digest):
            raise ValueError(f"bad sha256 digest {raw.strip()!r} (expected 64 hexadecimal characters)")
        return digest

    accepted, quarantined = _read_answers(folder, "sha256", (), check_digest, classes, GOLD_SUFFIXES)
    return _frame(accepted, GOLD_COLUMNS), _frame(quarantined, CHECK_QUARANTINE_COLUMNS)


def label_in_set(given: np.ndarray | pd.Series, true_labels: np.ndarray | pd.Series) -> np.ndarray:
    """Whether each given label is one of its canonical answer set.

    Parameters
    ----------
    given : (N,) str
        Labels in the taxonomy's spelling (as curated); compared exactly.
    true_labels : (N,) str
        Canonical sets (:func:`parse_label_set`), aligned with ``given`` by position.

    Returns
    -------
    np.ndarray (N,) bool
        False where either side is missing (not a string).
    """
    given, true_labels = np.asarray(given, dtype=object), np.asarray(true_labels, dtype=object)
    if given.shape != true_labels.shape or given.ndim != 1:
        raise ValueError(f"given {given.shape} and true_labels {true_labels.shape} must be aligned 1-d arrays")
    return np.fromiter((isinstance(label, str) and isinstance(answer, str)
                        and label in answer.split(LABEL_SEPARATOR)
                        for label, answer in zip(given, true_labels)), dtype=bool, count=len(given))


def gold_checks(rows: pd.DataFrame, gold: pd.DataFrame) -> pd.DataFrame:
    """The answers gold gives delivered images: every row whose content is a gold image gets its set.

    Parameters
    ----------
    rows : DataFrame (N, ...)
        Curated rows with at least ``image_id`` and ``sha256`` (the image file's digest).
    gold : DataFrame (G, ...)
        Accepted gold (:func:`read_gold`), at least ``sha256`` and ``true_labels``; for a digest
        given twice the first answer counts.

    Returns
    -------
    DataFrame (M, 2)
        ``image_id``, ``true_labels`` for the M <= N rows whose digest is gold, in the order of ``rows``.
        The same content delivered several times gives each of its images the answer.
    """
    answers = pd.Series(gold["true_labels"].to_numpy(), index=gold["sha256"].str.strip().str.lower().to_numpy())
    answers = answers[~answers.index.duplicated()]
    found = rows["sha256"].str.strip().str.lower().map(answers)
    matched = found.notna().to_numpy()
    return pd.DataFrame({"image_id": rows["image_id"].to_numpy()[matched],
                         "true_labels": found.to_numpy()[matched]}, columns=["image_id", "true_labels"])


def write_check_quarantine(quarantine_dir: Path, kind: str, frame: pd.DataFrame) -> list[Path]:
    """Write the quarantined rows of each answer file to ``quarantine_dir/kind/<file stem>.csv``.

    Each file is written atomically (CHECK_QUARANTINE_COLUMNS). Files left from an earlier run for
    answer files that no longer have quarantined rows are removed, so the folder always describes
    the answers as last read.

    Parameters
    ----------
    kind : str
        ``"checks"`` or ``"gold"``.
    frame : DataFrame (Q, 5)
        The quarantine of :func:`read_checks` or :func:`read_gold`.

    Returns
    -------
    list[Path]
        The files written, in file-name order.
    """
    if kind not in QUARANTINE_KINDS:
        raise ValueError(f"kind must be one of {QUARANTINE_KINDS}, not {kind!r}")
    folder = quarantine_dir / kind
    written = []
    for name, part in frame.groupby("file", sort=True):
        path = folder / f"{Path(str(name)).stem}.csv"
        atomic_write_csv(path, part[CHECK_QUARANTINE_COLUMNS])
        written.append(path)
    for stale in folder.glob("*.csv") if folder.is_dir() else []:
        if stale not in written:
            stale.unlink()
    return written
