"""Validation of one vendor delivery: every row ends curated or quarantined with a reason.

A delivery is ``landing/<vendor>/<batch>/`` with ``labels.csv``, the images, and ``_READY`` written last.
The curated folder (versioned by DVC) holds content only: rows, decoded images, the image format and
the taxonomy. What a delivery looked like when it was read (its change-detection fingerprint and
content digest, when it was read, its counts, whether it was rejected whole) is kept apart, under the home's state folder, so the dataset
version is a function of the data alone.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from ml.engine import Engine
from ml.files import atomic_write_bytes, atomic_write_csv, file_sha256
from ml.image_stack import ImageStack
from ml.images import ImageError, ImageLimits, decode_image, image_limits, probe_image

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
READY_MARKER = "_READY"
LABELS_FILE = "labels.csv"
REQUIRED_COLUMNS = ("image", "label")
OPTIONAL_COLUMNS = ("annotator", "labeled_at")
CURATED_COLUMNS = ["image_id", "vendor", "batch", "image", "label", "row", "sha256", "annotator"]
QUARANTINE_COLUMNS = ["vendor", "batch", "row", "image", "label", "reason"]
NAME_RULE = "name may only contain letters, digits, - and _"
TAXONOMY_FILE = "taxonomy.json"
# Photos are kept up to the input side of ImageNet backbones (224 px), so each backbone reads its own
# input size; features at 224 px were 3.7 points more accurate than at 128 px (README, Photos).
MAX_INFERRED_SIDE = 224
INFER_SAMPLE = 1000  # usable images whose sizes are read to infer the format (headers only, cheap)
INGESTED, REJECTED = "ingested", "rejected"
DECODE_BATCH = 256  # image files per decoding batch: one Ray task's share, or the local step between progress lines
PROGRESS_EVERY = 1000  # images decoded between progress lines


class DeliveryError(ValueError):
    """The delivery as a whole cannot be read; the message names the file and the reason."""


class TaxonomyChanged(ValueError):
    """The settings' class list differs from the one the curated data was ingested with."""


@dataclass(frozen=True)
class Delivery:
    vendor: str
    batch: str
    folder: Path

    @property
    def key(self) -> str:
        """The Dagster partition key, ``vendor.batch`` (names cannot contain dots)."""
        return f"{self.vendor}.{self.batch}"


@dataclass(frozen=True)
class ReadStamp:
    """What a delivery's folder held when it was read, and when (see :func:`stamp_delivery`).

    ``fingerprint``: :func:`delivery_fingerprint` (names, sizes, modification times: the fast check);
    ``content_digest``: :func:`delivery_content_digest` (the bytes: what decides a change);
    ``read_at``: ISO 8601 UTC time of the reading, which orders deliveries by arrival.
    """

    fingerprint: str
    content_digest: str
    read_at: str


@dataclass
class IngestResult:
    """``accepted``: one row per curated image (CURATED_COLUMNS); ``images``: uint8 (N, S, S, C)
    aligned with ``accepted``; ``quarantine``: rejected rows with a reason (QUARANTINE_COLUMNS);
    ``labeled_at``: the earliest ``labeled_at`` of its rows (ISO 8601 UTC), "" when none is given."""

    accepted: pd.DataFrame
    images: np.ndarray
    quarantine: pd.DataFrame
    n_delivered: int  # data rows read from labels.csv (blank lines excluded)
    stamp: ReadStamp | None = None  # the folder as it was read
    labeled_at: str = ""

    @property
    def reconciles(self) -> bool:
        return len(self.accepted) + len(self.quarantine) == self.n_delivered


def parse_key(key: str) -> tuple[str, str]:
    vendor, _, batch = key.partition(".")
    if not (NAME_RE.match(vendor) and NAME_RE.match(batch)):
        raise ValueError(f"invalid delivery key {key!r}: expected <vendor>.<batch>")
    return vendor, batch


@dataclass(frozen=True)
class IgnoredFolder:
    """An entry of the landing folder that is never opened: ``path`` relative to landing/, and why."""

    path: str
    reason: str


@dataclass
class LandingScan:
    """What the landing folder holds: complete deliveries, deliveries still waiting for ``_READY``,
    and entries ignored with the reason."""

    ready: list[Delivery] = field(default_factory=list)
    waiting: list[Delivery] = field(default_factory=list)
    ignored: list[IgnoredFolder] = field(default_factory=list)


def _why_ignored(entry: Path, expected: str) -> str | None:
    """Why ``entry`` cannot be a vendor or batch folder, or None when it can."""
    if entry.is_symlink():
        return f"a symlink where a {expected} folder is expected (never followed)"
    if not entry.is_dir():
        return f"a file where a {expected} folder is expected"
    if not NAME_RE.match(entry.name):
        return NAME_RULE
    return None


def scan_landing(landing: Path) -> LandingScan:
    """Sort every entry of ``landing`` into ready, waiting or ignored, in name order.

    A vendor folder that is ignored (bad name, symlink, a file) is never opened, so its batches are
    not listed.
    """
    scan = LandingScan()
    if not landing.is_dir():
        return scan
    for vendor_dir in sorted(landing.iterdir()):
        reason = _why_ignored(vendor_dir, "vendor")
        if reason:
            scan.ignored.append(IgnoredFolder(vendor_dir.name, reason))
            continue
        for batch_dir in sorted(vendor_dir.iterdir()):
            reason = _why_ignored(batch_dir, "batch")
            if reason:
                scan.ignored.append(IgnoredFolder(f"{vendor_dir.name}/{batch_dir.name}", reason))
                continue
            delivery = Delivery(vendor_dir.name, batch_dir.name, batch_dir)
            (scan.ready if (batch_dir / READY_MARKER).is_file() else scan.waiting).append(delivery)
    return scan


def find_ready_deliveries(landing: Path) -> list[Delivery]:
    """Complete deliveries (``_READY`` present) under ``landing``, sorted by key.

    Folders whose names are not letters, digits, ``-`` and ``_`` are skipped, never opened
    (:func:`scan_landing` says which and why).
    """
    return scan_landing(landing).ready


def read_labels_csv(path: Path, optional: tuple[str, ...] = ("annotator",)) -> pd.DataFrame:
    """Read ``labels.csv`` into strings: ``row`` (1-based data row number, header excluded), ``image``,
    ``label`` and the ``optional`` columns, by default ``annotator`` ("" where the file has no such column).

    The file is streamed row by row. Raises DeliveryError naming the file (and line) when it is
    missing, empty, not UTF-8, not parseable as CSV, or lacks a required column.
    """
    if not path.is_file():
        raise DeliveryError(f"{path}: labels.csv is missing")  # whatever the file is called
    return read_csv_columns(path, REQUIRED_COLUMNS, optional)


def read_csv_columns(path: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> pd.DataFrame:
    """Read the named columns of a CSV file as strings, streamed row by row.

    Header names match ignoring surrounding spaces and letter case (``required`` and ``optional``
    are given in lower case); a leading byte-order mark, CRLF or lone CR line ends and quoted
    fields are read. Rows whose fields are all blank are skipped but
    still counted, so ``row`` is the 1-based data row number (header excluded) a person sees.

    Returns
    -------
    DataFrame (N, 1 + len(required) + len(optional))
        ``row`` (int), then the ``required`` and ``optional`` columns as written (values not stripped;
        "" where the file has no such optional column or the row is short).

    Raises
    ------
    DeliveryError
        Naming the file (and line) when it is missing, empty, not UTF-8, not parseable as CSV, or
        lacks a required column.
    """
    if not path.is_file():
        raise DeliveryError(f"{path}: {path.name} is missing or not a file")
    columns = [*required, *optional]
    records = []
    with open(path, "rb") as fh:
        reader = csv.reader(_utf8_lines(fh, path))
        try:
            header = next(reader, None)
            if not header or not any(h.strip() for h in header):
                raise DeliveryError(f"{path}: empty file (expected a header with columns {','.join(required)})")
            header = [h.strip().lower() for h in header]
            missing = [c for c in required if c not in header]
            if missing:
                raise DeliveryError(f"{path}: missing required column(s) {', '.join(missing)} "
                                    f"(header: {','.join(header)})")
            positions = [header.index(c) if c in header else None for c in columns]
            for number, fields in enumerate(reader, start=1):
                if not fields or all(not f.strip() for f in fields):
                    continue
                records.append((number, *(fields[at] if at is not None and at < len(fields) else ""
                                          for at in positions)))
        except csv.Error as exc:
            raise DeliveryError(f"{path}: line {reader.line_num}: not valid CSV ({exc})") from exc
    return pd.DataFrame.from_records(records, columns=["row", *columns])


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


@dataclass
class DecodedFiles:
    """What decoding a list of image files gave, per file in the list's order.

    ``pixels``: uint8 (N, S, S, C), each file's decoded image (zeros where it is refused);
    ``sha256``: (N,) object, the hex digest of each file's bytes ("" where refused);
    ``reasons``: (N,) object, why each file is refused ("" where decoded).
    """

    pixels: np.ndarray
    sha256: np.ndarray
    reasons: np.ndarray

    @classmethod
    def allocate(cls, n_files: int, image_size: int, channels: int) -> DecodedFiles:
        return cls(np.zeros((n_files, image_size, image_size, channels), np.uint8),
                   np.full(n_files, "", object), np.full(n_files, "", object))

    def __getitem__(self, part: slice) -> DecodedFiles:
        """The files of ``part`` as views: decoding into them fills this."""
        return DecodedFiles(self.pixels[part], self.sha256[part], self.reasons[part])

    def place(self, at: np.ndarray, pixels: np.ndarray, sha256: np.ndarray, reasons: np.ndarray) -> None:
        """Put a batch decoded elsewhere at positions ``at`` (B,): ``pixels`` (B, S, S, C), ``sha256`` and
        ``reasons`` (B,)."""
        self.pixels[at], self.sha256[at], self.reasons[at] = pixels, sha256, reasons


def decode_files(paths: Sequence[Path | str], image_size: int, channels: int, limits: ImageLimits | None,
                 into: DecodedFiles | None = None) -> DecodedFiles:
    """Decode, check and hash each image file of ``paths``: the expensive part of ingestion, one file
    at a time and independent of the others, so any engine may run it on any share of the files.

    Parameters
    ----------
    paths : (N,) image files (already known to lie inside their delivery's folder).
    image_size, channels, limits : as :func:`ml.images.decode_image` takes them.
    into : where to write the N results (views of a larger :class:`DecodedFiles`); None: allocated here.

    Returns
    -------
    DecodedFiles
        Per path, the uint8 (image_size, image_size, channels) pixels and the file's sha256, or the
        :class:`ml.images.ImageError` message that refuses it. Any other exception propagates: it is a
        fault of the machine or the folder, not a reason to quarantine the row.
    """
    decoded = into if into is not None else DecodedFiles.allocate(len(paths), image_size, channels)
    for at, path in enumerate(paths):
        try:
            decoded.pixels[at] = decode_image(Path(path), image_size, channels, limits)
        except ImageError as exc:
            decoded.sha256[at], decoded.reasons[at] = "", str(exc)
            continue
        decoded.sha256[at], decoded.reasons[at] = file_sha256(Path(path)), ""
    return decoded


class _ToDecode(NamedTuple):
    """A row that passed the checks of its own fields: its image's name, its label in the taxonomy's
    spelling, and its file's position in the list to decode."""

    image_name: str
    label: str
    at: int


def ingest_delivery(
    delivery: Delivery,
    classes: tuple[str, ...],
    image_size: int,
    channels: int,
    limits: ImageLimits | None = None,
    stamp: ReadStamp | None = None,
    engine: Engine = Engine(),
) -> IngestResult:
    """Validate every row of a delivery and decode its accepted images.

    Labels are matched to ``classes`` ignoring surrounding spaces and letter case (normalised to the
    taxonomy's spelling). Images too small, too elongated (``limits``; None: the defaults for
    ``image_size``) or blank are quarantined: they carry no evidence to judge a label by. Rejected
    rows are kept in ``quarantine`` with the reason. ``stamp``: the folder as it was before reading
    (taken now when not given).

    The rows are checked in this process, in row order, in two passes around the decoding: first
    what each row says (path, label, a repeated row, a path leaving the folder), then what its file
    gave (a refused image, content seen at an earlier row). Only the decoding (:func:`decode_files`)
    runs on ``engine`` (default local): here, or as a Ray Data pipeline (:mod:`ml.ray_ingest`, on the
    Ray :func:`ml.ray_features.ray_session` gives for ``engine.ray_address``), so the result is the
    same whichever engine decodes.

    Raises
    ------
    DeliveryError
        ``labels.csv`` cannot be used.
    ml.ray_ingest.RayIngestError
        Decoding on Ray failed for another reason than an image's (workers lost beyond the retries,
        a delivery folder the cluster's workers cannot reach); nothing is returned to write.
    """
    limits = limits if limits is not None else image_limits(image_size)
    stamp = stamp or stamp_delivery(delivery.folder)
    labels = read_labels_csv(delivery.folder / LABELS_FILE, OPTIONAL_COLUMNS)
    rows = list(labels.itertuples(index=False))
    canonical = {c.casefold(): c for c in classes}
    checked: list[str | _ToDecode] = []  # per row: why it is refused, or what to decode for it
    to_decode: list[Path] = []
    seen_rows: dict[str, int] = {}
    for row in rows:
        image_name = row.image.strip()
        label = canonical.get(row.label.strip().casefold())
        if not image_name:
            checked.append("empty image path")
            continue
        if label is None:
            checked.append("empty label" if not row.label.strip() else f"unknown class {row.label.strip()!r}")
            continue
        if image_name in seen_rows:
            checked.append(f"duplicate image row (first at row {seen_rows[image_name]})")
            continue
        seen_rows[image_name] = row.row
        path = resolve_inside(delivery.folder, image_name)
        if path is None:
            checked.append("image path leaves the batch folder")
            continue
        checked.append(_ToDecode(image_name, label, len(to_decode)))
        to_decode.append(path)

    decoded = _decode(delivery, to_decode, image_size, channels, limits, engine)

    accepted, quarantined, kept = [], [], []
    seen_content: dict[str, tuple[int, str]] = {}
    for row, check in zip(rows, checked):
        reason = check if isinstance(check, str) else decoded.reasons[check.at]
        if not reason:
            digest = decoded.sha256[check.at]
            if digest in seen_content:
                first_row, first_label = seen_content[digest]
                relation = "the same label" if first_label == check.label else f"another label ({first_label})"
                reason = f"same image content as row {first_row}, with {relation}"
        if reason:
            quarantined.append({"vendor": delivery.vendor, "batch": delivery.batch, "row": row.row,
                                "image": row.image, "label": row.label, "reason": reason})
            continue
        seen_content[digest] = (row.row, check.label)
        accepted.append({"image_id": f"{delivery.vendor}/{delivery.batch}/{check.image_name}",
                         "vendor": delivery.vendor, "batch": delivery.batch, "image": check.image_name,
                         "label": check.label, "row": row.row, "sha256": digest, "annotator": row.annotator.strip()})
        kept.append(check.at)
    return IngestResult(pd.DataFrame(accepted, columns=CURATED_COLUMNS), _keep(decoded.pixels, kept),
                        pd.DataFrame(quarantined, columns=QUARANTINE_COLUMNS), n_delivered=len(labels),
                        stamp=stamp, labeled_at=earliest_time(labels["labeled_at"]))


def _decode(delivery: Delivery, paths: list[Path], image_size: int, channels: int, limits: ImageLimits,
            engine: Engine) -> DecodedFiles:
    """:func:`decode_files` of ``paths`` on ``engine``, logging the progress every PROGRESS_EVERY images."""
    decoded = DecodedFiles.allocate(len(paths), image_size, channels)
    on_ray = engine.on_ray
    where = f"on Ray ({engine.ray_address or 'local'})" if on_ray else "here"

    def follow(progress: Iterator[int]) -> None:
        started, logged = time.perf_counter(), 0  # Ray's start-up apart: it is the session's, not the decoding's
        for done in progress:
            if done // PROGRESS_EVERY > logged // PROGRESS_EVERY:
                log.info("%s: %d of %d images decoded %s", delivery.key, done, len(paths), where)
                logged = done
        seconds = time.perf_counter() - started
        log.info("%s: %d images decoded %s in %.1f s (%.0f images/s)", delivery.key, len(paths), where, seconds,
                 len(paths) / max(seconds, 1e-9))

    if on_ray:
        from ml.ray_features import ray_session
        from ml.ray_ingest import decode_files_on_ray

        with ray_session(engine.ray_address):
            follow(decode_files_on_ray(paths, image_size, channels, limits, decoded, f"delivery {delivery.key}"))
    else:
        follow(_decode_here(paths, image_size, channels, limits, decoded))
    return decoded


def _decode_here(paths: list[Path], image_size: int, channels: int, limits: ImageLimits,
                 into: DecodedFiles) -> Iterator[int]:
    """Decode ``paths`` into ``into`` in this process, DECODE_BATCH at a time (straight into the stack:
    no copy); yield the number done after each batch."""
    for start in range(0, len(paths), DECODE_BATCH):
        part = slice(start, start + DECODE_BATCH)
        decode_files(paths[part], image_size, channels, limits, into[part])
        yield min(start + DECODE_BATCH, len(paths))


def _keep(stack: np.ndarray, kept: list[int]) -> np.ndarray:
    """``stack[kept]`` (``kept`` ascending) without a second stack: each kept image moves down in place
    (most often none moves: few rows are refused after decoding). Where most were refused, a copy, so
    that the result does not hold the whole decoding buffer."""
    for to, at in enumerate(kept):
        if to != at:
            stack[to] = stack[at]
    kept_stack = stack[:len(kept)]
    return kept_stack.copy() if len(kept) < len(stack) // 2 else kept_stack


def infer_format(delivery: Delivery, limits: ImageLimits | None = None) -> tuple[int, int]:
    """``(image_size, channels)`` inferred from a delivery's images, read from their headers.

    The size is the median shorter side of the first INFER_SAMPLE images that can be opened and
    pass ``limits``' size and shape checks (None: the defaults while no size is known), at most
    MAX_INFERRED_SIDE (images are stored as squares cut from their centre, see decode_image); the
    channels are those of the first such image. A tiny or elongated image, or a few, cannot set the
    size of a home.
    """
    limits = limits if limits is not None else image_limits(None)
    labels = read_labels_csv(delivery.folder / LABELS_FILE)
    sides, first_channels = [], None
    for name in labels["image"]:
        path = resolve_inside(delivery.folder, name.strip())
        if path is None:
            continue
        try:
            height, width, channels = probe_image(path)
            limits.check_shape(height, width)
        except ImageError:
            continue
        sides.append(min(height, width))
        first_channels = first_channels or channels
        if len(sides) == INFER_SAMPLE:
            break
    if not sides:
        raise DeliveryError(f"{delivery.folder}: no usable image to infer the image size from (none can be "
                            f"opened with a shorter side of at least {limits.min_side} px and an aspect ratio "
                            f"of at most {limits.max_aspect_ratio:g}:1)")
    median_side = sorted(sides)[(len(sides) - 1) // 2]  # a side that occurs, not the mean of two
    return min(median_side, MAX_INFERRED_SIDE), first_channels


def _delivery_files(folder: Path) -> list[Path]:
    """Every file of a delivery but its ``_READY`` marker, in path order."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != READY_MARKER)


def delivery_fingerprint(folder: Path) -> str:
    """A cheap fingerprint of a delivery's files: labels.csv's content plus every file's name, size
    and modification time. Equal fingerprints: the delivery is taken as unchanged without reading its
    images; a different one is only a reason to compare :func:`delivery_content_digest`."""
    digest = hashlib.sha256()
    labels = folder / LABELS_FILE
    digest.update(labels.read_bytes() if labels.is_file() else b"")
    for path in _delivery_files(folder):
        stat = path.stat()
        digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def delivery_content_digest(folder: Path) -> str:
    """The sha256 of a delivery's content: every file's name (relative to the folder) and the sha256
    of its bytes, ``_READY`` excepted. Files rewritten byte for byte (new modification times, by a
    copy or a re-run of the vendor's export) keep it; any changed, added or removed file changes it."""
    digest = hashlib.sha256()
    for path in _delivery_files(folder):
        digest.update(f"{path.relative_to(folder)}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def utc_now() -> str:
    """The current time, ISO 8601 in UTC to the microsecond (text that sorts in time order)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def stamp_delivery(folder: Path) -> ReadStamp:
    """Fingerprint, content digest and time of a delivery about to be read."""
    return ReadStamp(delivery_fingerprint(folder), delivery_content_digest(folder), utc_now())


def earliest_time(values: pd.Series) -> str:
    """The earliest of ``values`` that reads as a date or time (ISO 8601 UTC; times without a zone
    are taken as UTC), "" when none does. Unreadable values are skipped: ``labeled_at`` is optional."""
    times = pd.to_datetime(values.astype(str).str.strip(), utc=True, errors="coerce", format="mixed")
    earliest = times.min()
    return "" if pd.isna(earliest) else earliest.isoformat(timespec="microseconds")


def is_ingested(delivery: Delivery, curated: Path) -> bool:
    """Whether the delivery's ingestion completed (its rows file, written last, exists)."""
    return (curated / delivery.vendor / delivery.batch / "rows.csv").is_file()


def state_path(state: Path, delivery: Delivery) -> Path:
    """Where a delivery's record lives: ``<state>/<vendor>/<batch>.json`` (outside curated/)."""
    return state / delivery.vendor / f"{delivery.batch}.json"


def read_state(state: Path, delivery: Delivery, curated: Path | None = None) -> dict | None:
    """A delivery's record (``status`` ingested or rejected, ``fingerprint``, ``content_digest``,
    ``ingested_at``, ``labeled_at``, ``n_delivered``, ``n_accepted``, ``n_quarantined``, ``reason`` when
    rejected), or None when it was never read. Records of earlier releases lack some of these fields.

    Homes made before records moved out of curated/ kept them as ``curated/<vendor>/<batch>/delivery.json``;
    that file is read when ``curated`` is given and no record exists.
    """
    path = state_path(state, delivery)
    if path.is_file():
        return json.loads(path.read_text())
    legacy = curated / delivery.vendor / delivery.batch / "delivery.json" if curated is not None else None
    if legacy is not None and legacy.is_file():
        return {"status": INGESTED, **json.loads(legacy.read_text())}
    return None


def write_state(state: Path, delivery: Delivery, record: dict) -> None:
    atomic_write_bytes(state_path(state, delivery), json.dumps(record, indent=2).encode())


def ingested_at(record: dict, state: Path, delivery: Delivery, curated: Path) -> str:
    """When a delivery was read (ISO 8601 UTC): its record's ``ingested_at``.

    Records written before that time was kept fall back to the earliest modification time of the
    files its ingestion wrote: the record and the curated rows. Both were written then and not
    since (a record is rewritten only once it holds ``ingested_at``), though a dataset checkout may
    rewrite the rows, hence the earliest of the two.
    """
    if record.get("ingested_at"):
        return record["ingested_at"]
    written = [state_path(state, delivery), curated / delivery.vendor / delivery.batch / "delivery.json",
               curated / delivery.vendor / delivery.batch / "rows.csv"]
    times = [p.stat().st_mtime for p in written if p.is_file()]
    return datetime.fromtimestamp(min(times), timezone.utc).isoformat(timespec="microseconds") if times else ""


def arrival_order(deliveries: list[Delivery], curated: Path, state: Path) -> pd.DataFrame:
    """When each delivery arrived, to tell which copy of a repeated image came first.

    Returns
    -------
    DataFrame (len(deliveries), 4)
        ``vendor, batch``, ``ingested_at`` (when it was read, see :func:`ingested_at`) and
        ``labeled_at`` (the earliest ``labeled_at`` of its rows), both ISO 8601 UTC text, "" unknown.
    """
    records = []
    for delivery in deliveries:
        record = read_state(state, delivery, curated) or {}
        records.append({"vendor": delivery.vendor, "batch": delivery.batch,
                        "ingested_at": ingested_at(record, state, delivery, curated),
                        "labeled_at": record.get("labeled_at", "")})
    return pd.DataFrame(records, columns=["vendor", "batch", "ingested_at", "labeled_at"])


def is_rejected(delivery: Delivery, state: Path) -> bool:
    """Whether the delivery was rejected whole (its labels.csv unusable): settled, not retried."""
    record = read_state(state, delivery)
    return record is not None and record.get("status") == REJECTED


def is_settled(delivery: Delivery, curated: Path, state: Path) -> bool:
    """Ingested, or rejected whole: nothing more to do for this delivery."""
    return is_ingested(delivery, curated) or is_rejected(delivery, state)


def has_changed(delivery: Delivery, curated: Path, state: Path) -> bool:
    """Whether a delivery's content changed in the landing folder since it was read (ingested or rejected).

    The recorded fingerprint (names, sizes, modification times) is the fast path: when it matches,
    nothing is read. When it differs, the files' bytes decide: the same content digest as when the
    delivery was read is no change (files rewritten byte for byte), and the record takes the new
    fingerprint, so the next check is fast again. A record written before content digests were kept
    has only its fingerprint: while that matches, the digest is taken now and recorded; once it no
    longer matches, there is no content to compare with and the delivery counts as changed.
    """
    if not (is_settled(delivery, curated, state)):
        return False
    record = read_state(state, delivery, curated)
    if record is None:
        return False
    fingerprint = delivery_fingerprint(delivery.folder)
    recorded = record.get("content_digest")
    if record["fingerprint"] == fingerprint:
        if not recorded:  # an older record: its files are as they were read, so their digest is theirs
            write_state(state, delivery, {**record, "content_digest": delivery_content_digest(delivery.folder),
                                          "ingested_at": ingested_at(record, state, delivery, curated)})
        return False
    if not recorded or delivery_content_digest(delivery.folder) != recorded:
        return True
    write_state(state, delivery, {**record, "fingerprint": fingerprint})
    return False


def changed_deliveries(landing: Path, curated: Path, state: Path) -> list[str]:
    """Keys of ingested or rejected deliveries whose files changed in the landing folder since."""
    return [d.key for d in find_ready_deliveries(landing) if has_changed(d, curated, state)]


# ---- curated storage -------------------------------------------------------------------------

def write_curated(curated: Path, quarantine: Path, state: Path, delivery: Delivery, result: IngestResult) -> None:
    """Store a delivery's curated rows and images, its quarantine and its record, each file atomically.

    Leftovers of an interrupted ingestion are removed first. The rows file is written last, so a rows
    file always has its images, quarantine and record.
    """
    folder = curated / delivery.vendor / delivery.batch
    if not (folder / "rows.csv").is_file():
        shutil.rmtree(folder, ignore_errors=True)  # temporary files of a killed run are not data
    buffer = io.BytesIO()
    np.save(buffer, result.images, allow_pickle=False)
    atomic_write_bytes(folder / "images.npy", buffer.getvalue())
    atomic_write_csv(quarantine / delivery.vendor / f"{delivery.batch}.csv", result.quarantine)
    write_state(state, delivery, {"status": INGESTED, **_stamp_record(result.stamp),
                                  "labeled_at": result.labeled_at, "n_delivered": result.n_delivered,
                                  "n_accepted": len(result.accepted), "n_quarantined": len(result.quarantine)})
    atomic_write_csv(folder / "rows.csv", result.accepted)  # last: a rows file always has its images


def _stamp_record(stamp: ReadStamp) -> dict:
    """The fields of a delivery's record that say what it held when it was read, and when."""
    return {"fingerprint": stamp.fingerprint, "content_digest": stamp.content_digest, "ingested_at": stamp.read_at}


def reject_delivery(curated: Path, quarantine: Path, state: Path, delivery: Delivery, reason: str,
                    stamp: ReadStamp) -> pd.DataFrame:
    """Quarantine a delivery whole: one quarantine row (``row`` 0, empty image and label) with the
    reason, nothing curated, and a record so that it is not read again. Returns the quarantine row."""
    shutil.rmtree(curated / delivery.vendor / delivery.batch, ignore_errors=True)  # no half-curated rest
    frame = pd.DataFrame([{"vendor": delivery.vendor, "batch": delivery.batch, "row": 0, "image": "",
                           "label": "", "reason": reason}], columns=QUARANTINE_COLUMNS)
    atomic_write_csv(quarantine / delivery.vendor / f"{delivery.batch}.csv", frame)
    write_state(state, delivery, {"status": REJECTED, **_stamp_record(stamp), "reason": reason,
                                  "n_delivered": None, "n_accepted": 0, "n_quarantined": None})
    return frame


def has_curated(curated: Path) -> bool:
    """Whether at least one delivery is curated."""
    return any(curated.glob("*/*/rows.csv"))


def _curated_row_files(curated: Path) -> list[Path]:
    files = sorted(curated.glob("*/*/rows.csv"))
    if not files:
        raise DeliveryError(f"{curated}: no curated delivery yet (land a delivery with _READY and ingest it)")
    return files


def _read_rows(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame["row"] = frame["row"].astype(int)
    if "annotator" not in frame:  # curated before annotators were kept
        frame["annotator"] = ""
    return frame


def load_curated_rows(curated: Path) -> pd.DataFrame:
    """All curated rows (CURATED_COLUMNS), deliveries in key order."""
    return pd.concat([_read_rows(p) for p in _curated_row_files(curated)], ignore_index=True)


def duplicate_of(rows: pd.DataFrame, arrivals: pd.DataFrame) -> pd.Series:
    """Per curated row (N,): the image_id of the copy with the same content that arrived first, else "".

    ``arrivals`` (:func:`arrival_order`) orders the deliveries: the one ingested first, then the one
    with the earliest ``labeled_at`` (deliveries without it after those with it), and vendor and batch
    name only between deliveries tied on both. ``rows`` needs ``image_id, vendor, batch, sha256``.
    """
    times = arrivals.set_index(["vendor", "batch"])
    keys = pd.MultiIndex.from_frame(rows[["vendor", "batch"]])

    def per_row(column: str) -> np.ndarray:  # "" (unknown) and deliveries not in arrivals: NaT, sorted last
        text = times[column].reindex(keys).fillna("").astype(str)
        return pd.to_datetime(text.where(text != ""), utc=True, format="ISO8601").to_numpy()

    order = pd.DataFrame({"ingested_at": per_row("ingested_at"), "labeled_at": per_row("labeled_at"),
                          "vendor": rows["vendor"].to_numpy(), "batch": rows["batch"].to_numpy()}, index=rows.index)
    ranked = order.sort_values(["ingested_at", "labeled_at", "vendor", "batch"], kind="stable", na_position="last")
    first = rows.loc[ranked.index].groupby("sha256")["image_id"].transform("first").reindex(rows.index)
    return first.where(first != rows["image_id"], "")


def load_curated_delivery(curated: Path, vendor: str, batch: str) -> tuple[pd.DataFrame, np.ndarray]:
    """One curated delivery: its rows and uint8 images (N, S, S, C), memory-mapped (read where used)."""
    folder = curated / vendor / batch
    if not (folder / "rows.csv").is_file():
        raise DeliveryError(f"{folder}: delivery {vendor}.{batch} is not curated (ingest it first)")
    return _read_rows(folder / "rows.csv"), np.load(folder / "images.npy", mmap_mode="r", allow_pickle=False)


def load_curated(curated: Path) -> tuple[pd.DataFrame, ImageStack]:
    """All curated deliveries in key order: the rows (CURATED_COLUMNS) and their uint8 images
    (N, S, S, C), memory-mapped per delivery (:class:`ml.image_stack.ImageStack`): pixels are read
    only where used."""
    files = _curated_row_files(curated)
    rows = pd.concat([_read_rows(p) for p in files], ignore_index=True)
    return rows, ImageStack.open([p.parent / "images.npy" for p in files])


def read_format(curated: Path) -> tuple[int, int] | None:
    path = curated / "format.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return int(data["image_size"]), int(data["channels"])


def write_format(curated: Path, image_size: int, channels: int) -> None:
    atomic_write_bytes(curated / "format.json", json.dumps({"image_size": image_size, "channels": channels}).encode())


# ---- taxonomy --------------------------------------------------------------------------------

def read_taxonomy(curated: Path) -> tuple[str, ...] | None:
    """The class list the curated data was ingested with, or None when none is recorded."""
    path = curated / TAXONOMY_FILE
    return tuple(json.loads(path.read_text())["classes"]) if path.is_file() else None


def record_taxonomy(curated: Path, classes: tuple[str, ...]) -> None:
    """Record the class list of the curated labels (content only: the names in order)."""
    atomic_write_bytes(curated / TAXONOMY_FILE, json.dumps({"classes": list(classes)}, indent=2).encode())


def describe_taxonomy_change(recorded: tuple[str, ...], classes: tuple[str, ...]) -> str:
    """``"renamed 'dog' -> 'Dog'; added 'bird'"`` and the like; empty when the lists are equal.

    A class removed at the place where another is added is read as a rename.
    """
    if tuple(recorded) == tuple(classes):
        return ""
    removed = [c for c in recorded if c not in classes]
    added = [c for c in classes if c not in recorded]
    renamed = [(old, classes[i]) for i, old in enumerate(recorded)
               if old in removed and i < len(classes) and classes[i] in added]
    removed = [c for c in removed if c not in {old for old, _ in renamed}]
    added = [c for c in added if c not in {new for _, new in renamed}]
    parts = [f"renamed {old!r} -> {new!r}" for old, new in renamed]
    parts += [f"added {c!r}" for c in added] + [f"removed {c!r}" for c in removed]
    if not parts:
        parts.append("the same classes in another order (class numbers change)")
    return "; ".join(parts)


def check_taxonomy(curated: Path, classes: tuple[str, ...], settings_file: Path | str = "the settings") -> None:
    """Raise TaxonomyChanged when ``classes`` differ from the class list the curated data was
    ingested with (``curated/taxonomy.json``). Curated data from before the list was recorded is
    checked against its labels: each must be one of ``classes``."""
    recorded = read_taxonomy(curated)
    if recorded is None:
        if not has_curated(curated):
            return
        labels = sorted(set(load_curated_rows(curated)["label"]))
        unknown = [label for label in labels if label not in classes]
        if not unknown:
            return
        change, old = f"curated labels {unknown} are not among them", labels
    else:
        change, old = describe_taxonomy_change(recorded, classes), list(recorded)
        if not change:
            return
    raise TaxonomyChanged(
        f"{settings_file}: 'classes' differ from the taxonomy the curated data was ingested with "
        f"({curated / TAXONOMY_FILE}): {change}. The curated labels and the trained models use the old "
        f"list {old}. Nothing was run. Restore the old list in the settings, or start a new home "
        f"(--home) and deliver again.")


# ---- what a run did, for its summary -------------------------------------------------------------

@dataclass
class DeliveryOutcome:
    """How one delivery was read: ``status`` ingested or rejected; row counts (None where the rows
    could not be read); the most frequent quarantine reasons as (reason, count); ``reason``: why it
    was rejected whole; ``quarantine_share`` against ``share_limit`` (a rejected delivery counts 1.0)."""

    key: str
    status: str
    n_delivered: int | None
    n_accepted: int
    n_quarantined: int | None
    top_reasons: list[tuple[str, int]]
    reason: str
    quarantine_share: float
    share_limit: float

    @property
    def check_failed(self) -> bool:
        return self.quarantine_share > self.share_limit


def reason_kind(reason: str) -> str:
    """A quarantine reason without its row numbers and parenthesised details, to count alike reasons
    together: ``duplicate image row (first at row 3)`` -> ``duplicate image row``."""
    kind = re.sub(r"\s*\([^()]*\)", "", reason)
    return re.sub(r"\brow \d+", "row N", kind).strip() or reason


def delivery_outcome(delivery: Delivery, quarantine: Path, state: Path, share_limit: float,
                     top: int = 3) -> DeliveryOutcome | None:
    """The outcome of a delivery from its record and quarantine file; None when it was never read."""
    record = read_state(state, delivery)
    if record is None:
        return None
    if record.get("status") == REJECTED:
        return DeliveryOutcome(delivery.key, REJECTED, None, 0, None, [], record.get("reason", ""), 1.0, share_limit)
    path = quarantine / delivery.vendor / f"{delivery.batch}.csv"
    reasons = pd.read_csv(path, dtype=str, keep_default_na=False)["reason"] if path.is_file() else pd.Series([], dtype=str)
    counts = reasons.map(reason_kind).value_counts()
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top]
    n_delivered, n_quarantined = int(record["n_delivered"]), int(record["n_quarantined"])
    share = n_quarantined / n_delivered if n_delivered else 0.0
    return DeliveryOutcome(delivery.key, INGESTED, n_delivered, int(record["n_accepted"]), n_quarantined,
                           [(str(r), int(c)) for r, c in ordered], "", share, share_limit)


@dataclass
class RunSummary:
    """What one run found: ``outcomes`` of the deliveries read in this run, deliveries that changed
    after they were read (keys), landing entries ``ignored`` and deliveries ``waiting`` for
    ``_READY`` (``vendor/batch``), and ``vendor_warnings`` (vendor -> note from the scorecard)."""

    outcomes: list[DeliveryOutcome] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    ignored: list[IgnoredFolder] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    vendor_warnings: dict[str, str] = field(default_factory=dict)

    @property
    def ingested(self) -> list[DeliveryOutcome]:
        return [o for o in self.outcomes if o.status == INGESTED]

    @property
    def rejected(self) -> list[DeliveryOutcome]:
        return [o for o in self.outcomes if o.status == REJECTED]

    @property
    def failed_checks(self) -> list[DeliveryOutcome]:
        return [o for o in self.outcomes if o.check_failed]

    @property
    def input_problems(self) -> bool:
        """A delivery read in this run was rejected whole or failed its quarantine_share check."""
        return bool(self.rejected or self.failed_checks)


def vendor_notes(scorecard_csv: Path) -> dict[str, str]:
    """vendor -> the non-empty ``note`` of its scorecard row (a warning about that vendor's figures)."""
    if not scorecard_csv.is_file():
        return {}
    card = pd.read_csv(scorecard_csv, dtype=str, keep_default_na=False)
    if "note" not in card.columns:
        return {}
    return {v: n.strip() for v, n in zip(card["vendor"], card["note"]) if n.strip()}


def summarize_run(read_keys: list[str], landing: Path, curated: Path, quarantine: Path, state: Path,
                  share_limit: float, scorecard_csv: Path | None = None, changed: list[str] | None = None) -> RunSummary:
    """Gather the facts a run reports: outcomes of the deliveries in ``read_keys`` (read in this run),
    changed (found again unless given), ignored and waiting landing entries, and vendor warnings from
    ``scorecard_csv``."""
    scan = scan_landing(landing)
    outcomes = []
    for key in read_keys:
        vendor, batch = parse_key(key)
        outcome = delivery_outcome(Delivery(vendor, batch, landing / vendor / batch), quarantine, state, share_limit)
        if outcome is not None:
            outcomes.append(outcome)
    if changed is None:
        changed = [d.key for d in scan.ready if has_changed(d, curated, state)]
    return RunSummary(outcomes=outcomes, changed=changed, ignored=scan.ignored,
                      waiting=[f"{d.vendor}/{d.batch}" for d in scan.waiting],
                      vendor_warnings=vendor_notes(scorecard_csv) if scorecard_csv is not None else {})
