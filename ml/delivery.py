"""Validation of one vendor delivery: every row ends curated or quarantined with a reason.

A delivery is ``landing/<vendor>/<batch>/`` with ``labels.csv``, the images, and ``_READY`` written last.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ml.files import atomic_write_bytes, atomic_write_csv
from ml.images import ImageError, decode_image, probe_image

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
READY_MARKER = "_READY"
LABELS_FILE = "labels.csv"
REQUIRED_COLUMNS = ("image", "label")
OPTIONAL_COLUMNS = ("annotator", "labeled_at")
CURATED_COLUMNS = ["image_id", "vendor", "batch", "image", "label", "row", "sha256"]
QUARANTINE_COLUMNS = ["vendor", "batch", "row", "image", "label", "reason"]


class DeliveryError(ValueError):
    """The delivery as a whole cannot be read; the message names the file and the reason."""


@dataclass(frozen=True)
class Delivery:
    vendor: str
    batch: str
    folder: Path

    @property
    def key(self) -> str:
        """The Dagster partition key, ``vendor.batch`` (names cannot contain dots)."""
        return f"{self.vendor}.{self.batch}"


@dataclass
class IngestResult:
    """``accepted``: one row per curated image (CURATED_COLUMNS); ``images``: uint8 (N, S, S, C)
    aligned with ``accepted``; ``quarantine``: rejected rows with a reason (QUARANTINE_COLUMNS)."""

    accepted: pd.DataFrame
    images: np.ndarray
    quarantine: pd.DataFrame
    n_delivered: int  # data rows read from labels.csv (blank lines excluded)
    fingerprint: str = ""  # delivery_fingerprint() of the folder as it was read

    @property
    def reconciles(self) -> bool:
        return len(self.accepted) + len(self.quarantine) == self.n_delivered


def parse_key(key: str) -> tuple[str, str]:
    vendor, _, batch = key.partition(".")
    if not (NAME_RE.match(vendor) and NAME_RE.match(batch)):
        raise ValueError(f"invalid delivery key {key!r}: expected <vendor>.<batch>")
    return vendor, batch


def find_ready_deliveries(landing: Path) -> list[Delivery]:
    """Complete deliveries (``_READY`` present) under ``landing``, sorted by key.

    Folders whose names are not letters, digits, ``-`` and ``_`` are skipped, never opened.
    """
    found = []
    if not landing.is_dir():
        return found
    for vendor_dir in sorted(p for p in landing.iterdir() if p.is_dir() and not p.is_symlink()):
        if not NAME_RE.match(vendor_dir.name):
            continue
        for batch_dir in sorted(p for p in vendor_dir.iterdir() if p.is_dir() and not p.is_symlink()):
            if NAME_RE.match(batch_dir.name) and (batch_dir / READY_MARKER).is_file():
                found.append(Delivery(vendor_dir.name, batch_dir.name, batch_dir))
    return found


def read_labels_csv(path: Path) -> pd.DataFrame:
    """Read ``labels.csv`` into strings with a 1-based ``row`` (data row number, header excluded).

    The file is streamed row by row. Raises DeliveryError naming the file (and line) when it is
    missing, empty, not UTF-8, not parseable as CSV, or lacks a required column.
    """
    if not path.is_file():
        raise DeliveryError(f"{path}: labels.csv is missing")
    records = []
    with open(path, "rb") as fh:
        reader = csv.reader(_utf8_lines(fh, path))
        try:
            header = next(reader, None)
            if not header or not any(h.strip() for h in header):
                raise DeliveryError(f"{path}: empty file (expected a header with columns image,label)")
            header = [h.strip().lower() for h in header]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise DeliveryError(f"{path}: missing required column(s) {', '.join(missing)} "
                                    f"(header: {','.join(header)})")
            image_at, label_at = header.index("image"), header.index("label")
            for number, fields in enumerate(reader, start=1):
                if not fields or all(not f.strip() for f in fields):
                    continue
                image = fields[image_at] if image_at < len(fields) else ""
                label = fields[label_at] if label_at < len(fields) else ""
                records.append((number, image, label))
        except csv.Error as exc:
            raise DeliveryError(f"{path}: line {reader.line_num}: not valid CSV ({exc})") from exc
    return pd.DataFrame.from_records(records, columns=["row", "image", "label"])


_LONE_CR = re.compile(r"(?<=\r)(?!\n)")


def _utf8_lines(fh, path: Path):
    """Decode a binary file line by line (a leading byte-order mark dropped), naming the first bad line."""
    for number, raw in enumerate(fh, start=1):
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DeliveryError(f"{path}: line {number}: not UTF-8 text ({exc.reason})") from exc
        yield from _LONE_CR.split(line)  # csv expects lines split at \r too, as with newline=""


def resolve_inside(folder: Path, relative: str) -> Path | None:
    """The file ``relative`` names inside ``folder``, or None when it would leave the folder
    (absolute paths, ``..``, symlinks pointing outside)."""
    if not relative or relative.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", relative):
        return None
    root = folder.resolve()
    target = (root / relative).resolve()
    return target if target.is_relative_to(root) and target != root else None


def ingest_delivery(
    delivery: Delivery,
    classes: tuple[str, ...],
    image_size: int,
    channels: int,
) -> IngestResult:
    """Validate every row of a delivery and decode its accepted images.

    Labels are matched to ``classes`` ignoring surrounding spaces and letter case (normalised to the
    taxonomy's spelling). Rejected rows are kept in ``quarantine`` with the reason.
    """
    fingerprint = delivery_fingerprint(delivery.folder)
    labels = read_labels_csv(delivery.folder / LABELS_FILE)
    canonical = {c.casefold(): c for c in classes}
    accepted, images, quarantined = [], [], []
    seen_rows: dict[str, int] = {}
    seen_content: dict[str, tuple[int, str]] = {}

    def reject(row, reason: str) -> None:
        quarantined.append({"vendor": delivery.vendor, "batch": delivery.batch, "row": row.row,
                            "image": row.image, "label": row.label, "reason": reason})

    for number, row in enumerate(labels.itertuples(index=False), start=1):
        if number % 1000 == 0:
            log.info("%s: %d of %d rows checked", delivery.key, number, len(labels))
        image_name = row.image.strip()
        label = canonical.get(row.label.strip().casefold())
        if not image_name:
            reject(row, "empty image path")
            continue
        if label is None:
            reject(row, "empty label" if not row.label.strip() else f"unknown class {row.label.strip()!r}")
            continue
        if image_name in seen_rows:
            reject(row, f"duplicate image row (first at row {seen_rows[image_name]})")
            continue
        seen_rows[image_name] = row.row
        path = resolve_inside(delivery.folder, image_name)
        if path is None:
            reject(row, "image path leaves the batch folder")
            continue
        try:
            pixels = decode_image(path, image_size, channels)
        except ImageError as exc:
            reject(row, str(exc))
            continue
        digest = _sha256(path)
        if digest in seen_content:
            first_row, first_label = seen_content[digest]
            relation = "the same label" if first_label == label else f"another label ({first_label})"
            reject(row, f"same image content as row {first_row}, with {relation}")
            continue
        seen_content[digest] = (row.row, label)
        accepted.append({"image_id": f"{delivery.vendor}/{delivery.batch}/{image_name}",
                         "vendor": delivery.vendor, "batch": delivery.batch, "image": image_name,
                         "label": label, "row": row.row, "sha256": digest})
        images.append(pixels)
    stack = np.stack(images) if images else np.zeros((0, image_size, image_size, channels), np.uint8)
    return IngestResult(pd.DataFrame(accepted, columns=CURATED_COLUMNS), stack,
                        pd.DataFrame(quarantined, columns=QUARANTINE_COLUMNS), n_delivered=len(labels),
                        fingerprint=fingerprint)


def infer_format(delivery: Delivery) -> tuple[int, int]:
    """``(image_size, channels)`` from the first decodable image of a delivery (square, side <= 128)."""
    labels = read_labels_csv(delivery.folder / LABELS_FILE)
    for name in labels["image"]:
        path = resolve_inside(delivery.folder, name.strip())
        if path is None:
            continue
        try:
            height, width, channels = probe_image(path)
        except ImageError:
            continue
        return min(max(height, width), 128), channels
    raise DeliveryError(f"{delivery.folder}: no decodable image to infer the image size from")


def delivery_fingerprint(folder: Path) -> str:
    """A cheap fingerprint of a delivery's files: labels.csv's content plus every file's name, size
    and modification time. It changes when anything in the delivery is replaced after ingestion."""
    digest = hashlib.sha256()
    labels = folder / LABELS_FILE
    digest.update(labels.read_bytes() if labels.is_file() else b"")
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != READY_MARKER):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def is_ingested(delivery: Delivery, curated: Path) -> bool:
    """Whether the delivery's ingestion completed (its rows file, written last, exists)."""
    return (curated / delivery.vendor / delivery.batch / "rows.csv").is_file()


def has_changed(delivery: Delivery, curated: Path) -> bool:
    """Whether an ingested delivery's files changed in the landing folder since its ingestion."""
    record = curated / delivery.vendor / delivery.batch / "delivery.json"
    return record.is_file() and json.loads(record.read_text())["fingerprint"] != delivery_fingerprint(delivery.folder)


def changed_deliveries(landing: Path, curated: Path) -> list[str]:
    """Keys of ingested deliveries whose files changed in the landing folder since ingestion."""
    return [d.key for d in find_ready_deliveries(landing) if has_changed(d, curated)]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- curated storage -------------------------------------------------------------------------

def write_curated(curated: Path, quarantine: Path, delivery: Delivery, result: IngestResult) -> None:
    """Store a delivery's curated rows and images and its quarantine, each file atomically.

    The rows file is written last, so a rows file always has its images, quarantine and record.
    """
    folder = curated / delivery.vendor / delivery.batch
    buffer = io.BytesIO()
    np.save(buffer, result.images, allow_pickle=False)
    atomic_write_bytes(folder / "images.npy", buffer.getvalue())
    atomic_write_csv(quarantine / delivery.vendor / f"{delivery.batch}.csv", result.quarantine)
    record = {"fingerprint": result.fingerprint, "n_delivered": result.n_delivered,
              "n_accepted": len(result.accepted), "n_quarantined": len(result.quarantine)}
    atomic_write_bytes(folder / "delivery.json", json.dumps(record, indent=2).encode())
    atomic_write_csv(folder / "rows.csv", result.accepted)  # last: a rows file always has its images


def _curated_row_files(curated: Path) -> list[Path]:
    files = sorted(curated.glob("*/*/rows.csv"))
    if not files:
        raise DeliveryError(f"{curated}: no curated delivery yet (land a delivery with _READY and ingest it)")
    return files


def _read_rows(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame["row"] = frame["row"].astype(int)
    return frame


def load_curated_rows(curated: Path) -> pd.DataFrame:
    """All curated rows (CURATED_COLUMNS), deliveries in key order."""
    return pd.concat([_read_rows(p) for p in _curated_row_files(curated)], ignore_index=True)


def duplicate_of(rows: pd.DataFrame) -> pd.Series:
    """Per curated row (N,): the image_id of the first earlier row with the same content, else ""."""
    first = rows.groupby("sha256")["image_id"].transform("first")
    return first.where(first != rows["image_id"], "")


def load_curated_delivery(curated: Path, vendor: str, batch: str) -> tuple[pd.DataFrame, np.ndarray]:
    """One curated delivery: its rows and uint8 images (N, S, S, C)."""
    folder = curated / vendor / batch
    if not (folder / "rows.csv").is_file():
        raise DeliveryError(f"{folder}: delivery {vendor}.{batch} is not curated (ingest it first)")
    return _read_rows(folder / "rows.csv"), np.load(folder / "images.npy", allow_pickle=False)


def load_curated(curated: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """All curated deliveries in key order: the rows (CURATED_COLUMNS) and uint8 images (N, S, S, C)."""
    files = _curated_row_files(curated)
    rows = pd.concat([_read_rows(p) for p in files], ignore_index=True)
    return rows, np.concatenate([np.load(p.parent / "images.npy", allow_pickle=False) for p in files])


def read_format(curated: Path) -> tuple[int, int] | None:
    path = curated / "format.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return int(data["image_size"]), int(data["channels"])


def write_format(curated: Path, image_size: int, channels: int) -> None:
    atomic_write_bytes(curated / "format.json", json.dumps({"image_size": image_size, "channels": channels}).encode())
