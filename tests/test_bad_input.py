"""Untrusted deliveries: the labels.csv reader under generated input, and hostile or odd images."""

import csv
import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from ml.delivery import Delivery, DeliveryError, ingest_delivery, read_labels_csv
from ml.images import ImageError, decode_image

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(text, text, text), max_size=30), bom=st.booleans(), crlf=st.booleans())
def test_reader_returns_every_written_row_unchanged(tmp_path_factory, rows, bom, crlf):
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n" if crlf else "\n", quoting=csv.QUOTE_ALL)
    writer.writerow(["image", "label", "annotator"])
    writer.writerows(rows)
    path = tmp_path_factory.mktemp("csv") / "labels.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + buffer.getvalue().encode("utf-8"))
    frame = read_labels_csv(path)
    kept = [(i + 1, *r) for i, r in enumerate(rows) if any(f.strip() for f in r)]
    assert list(frame.itertuples(index=False, name=None)) == kept


@settings(max_examples=150)
@given(data=st.binary(max_size=300))
def test_reader_never_fails_other_than_with_a_delivery_error(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("csv") / "labels.csv"
    path.write_bytes(b"image,label\n" + data)
    try:
        frame = read_labels_csv(path)
    except DeliveryError as exc:
        assert str(path) in str(exc)
    else:
        assert list(frame.columns) == ["row", "image", "label", "annotator"]


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"\xef\xbb\xbf", "empty file"),
    (b"image;label\na.png;cat\n", "missing required column"),
    (b"image,label\n" + b"x" * 200_000 + b",cat\n", "line 2: not valid CSV"),
])
def test_unreadable_labels_files_are_named_with_the_reason(tmp_path, content, reason):
    path = tmp_path / "labels.csv"
    path.write_bytes(content)
    with pytest.raises(DeliveryError, match=reason):
        read_labels_csv(path)


def test_header_only_file_delivers_no_rows(tmp_path):
    (tmp_path / "labels.csv").write_text("image,label,annotator,labeled_at\n")
    assert len(read_labels_csv(tmp_path / "labels.csv")) == 0


def test_large_labels_file_is_read_row_by_row(tmp_path):
    path = tmp_path / "labels.csv"
    with open(path, "w") as fh:
        fh.write("image,label\n")
        for i in range(200_000):
            fh.write(f"images/{i}.png,cat\n")
    frame = read_labels_csv(path)
    assert len(frame) == 200_000 and frame["row"].iloc[-1] == 200_000


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    # a tiny file declaring 30,000 x 30,000 pixels (900 Mpx): refused from its header alone
    header = struct.pack(">IIBBBBB", 30_000, 30_000, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 100)) \
        + _png_chunk(b"IEND", b"")
    path = tmp_path / "bomb.png"
    path.write_bytes(png)
    assert path.stat().st_size < 500
    with pytest.raises(ImageError, match="not a readable image|exceeds"):
        decode_image(path, 28, 1)


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((16, 32), np.uint8)
    pixels[:, 8:12] = 255  # a bright band left of centre (the centre square keeps columns 8-23)
    image = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    ImageOps.exif_transpose(Image.open(tmp_path / "rotated.jpg")).save(tmp_path / "upright.png")
    decoded = decode_image(tmp_path / "rotated.jpg", 32, 1).astype(int)
    expected = decode_image(tmp_path / "upright.png", 32, 1).astype(int)
    assert np.abs(decoded - expected).mean() < 3
    assert decoded[:8].mean() > 200 and decoded[-8:].mean() < 50  # the band is now on top


@pytest.mark.parametrize("name, content, reason", [
    ("truncated.jpg", "truncated-jpeg", "cannot decode|not a readable"),
    ("fake.png", b"just text", "not a readable image"),
    ("picture.gif", "gif", "unsupported image format GIF"),
])
def test_broken_or_unsupported_images_are_quarantined(tmp_path, name, content, reason):
    folder = tmp_path / "landing" / "v" / "b"
    folder.mkdir(parents=True)
    buffer = io.BytesIO()
    if content == "truncated-jpeg":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, "JPEG")
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    elif content == "gif":
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(buffer, "GIF")
        content = buffer.getvalue()
    (folder / name).write_bytes(content)
    (folder / "labels.csv").write_text(f"image,label\n{name},cat\n")
    result = ingest_delivery(Delivery("v", "b", folder), ("cat", "dog"), 8, 1)
    assert result.reconciles and len(result.accepted) == 0
    assert result.quarantine["reason"].str.contains(reason).all(), result.quarantine["reason"].tolist()
