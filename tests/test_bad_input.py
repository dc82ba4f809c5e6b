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


def test_a_row_naming_a_folder_is_quarantined(tmp_path):
    folder = tmp_path / "landing" / "v" / "b"
    (folder / "album.png").mkdir(parents=True)
    Image.fromarray(_noise(16, 16)).save(folder / "photo.png")
    (folder / "labels.csv").write_text("image,label\nalbum.png,cat\nphoto.png,dog\n")
    result = ingest_delivery(Delivery("v", "b", folder), ("cat", "dog"), 16, 1)
    assert result.reconciles and result.accepted["image"].tolist() == ["photo.png"]
    assert result.quarantine["reason"].tolist() == ["a folder, not an image file"]


def _land(tmp_path, images: dict) -> Delivery:
    """A ready delivery of real image files written with PIL (name -> uint8 array), all labelled cat."""
    folder = tmp_path / "landing" / "v" / "b"
    folder.mkdir(parents=True)
    for name, pixels in images.items():
        Image.fromarray(pixels).save(folder / name, quality=95)
    (folder / "labels.csv").write_text("image,label\n" + "".join(f"{name},cat\n" for name in images))
    (folder / "_READY").write_text("")
    return Delivery("v", "b", folder)


def _noise(height: int, width: int, channels: int = 0, seed: int = 0) -> np.ndarray:
    shape = (height, width, channels) if channels else (height, width)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_degenerate_images_are_quarantined_with_the_reason_and_the_rest_accepted(tmp_path):
    from ml.delivery import delivery_outcome, write_curated

    faint = np.zeros((32, 32), np.uint8)
    faint[::2] = 1  # low contrast is content, not blank: only an exactly uniform image is
    delivery = _land(tmp_path, {
        "photo.png": _noise(32, 32, 3),
        "photo.jpg": _noise(40, 32, 3, seed=1),
        "faint.png": faint,
        "smallest.png": _noise(8, 30, seed=2),     # shorter side at the limit, ratio 3.75: kept
        "four-to-one.png": _noise(10, 40, seed=3),  # exactly the limit: kept
        "dot.png": np.full((1, 1), 17, np.uint8),   # the reported case: scored p_error 1.0 before
        "thin.png": _noise(7, 20, seed=4),
        "black.png": np.zeros((32, 32), np.uint8),
        "grey.jpg": np.full((48, 64), 128, np.uint8),
        "red.png": np.full((32, 32, 3), (255, 0, 0), np.uint8),  # one colour: every pixel alike
        "banner.png": _noise(10, 120, 3, seed=5),
        "pole.jpg": _noise(50, 10, seed=6),
    })
    result = ingest_delivery(delivery, ("cat", "dog"), 32, 3)
    reasons = dict(zip(result.quarantine["image"], result.quarantine["reason"]))
    assert reasons == {
        "dot.png": "image too small (1x1 px; min_image_side 8 px)",
        "thin.png": "image too small (20x7 px; min_image_side 8 px)",
        "black.png": "image is blank: every pixel has the same value (0, 0, 0)",
        "grey.jpg": "image is blank: every pixel has the same value (128, 128, 128)",
        "red.png": "image is blank: every pixel has the same value (255, 0, 0)",
        "banner.png": "extreme aspect ratio (12:1, 120x10 px; max_aspect_ratio 4)",
        "pole.jpg": "extreme aspect ratio (5:1, 10x50 px; max_aspect_ratio 4)",
    }
    assert result.accepted["image"].tolist() == ["photo.png", "photo.jpg", "faint.png", "smallest.png",
                                                 "four-to-one.png"]
    assert result.images.shape == (5, 32, 32, 3) and result.reconciles and result.n_delivered == 12
    # the run summary counts them by kind, whatever the sizes and values
    write_curated(tmp_path / "curated", tmp_path / "quarantine", tmp_path / "state", delivery, result)
    outcome = delivery_outcome(delivery, tmp_path / "quarantine", tmp_path / "state", 0.05)
    assert (outcome.n_delivered, outcome.n_accepted, outcome.n_quarantined) == (12, 5, 7)
    assert outcome.top_reasons == [("image is blank: every pixel has the same value", 3),
                                   ("extreme aspect ratio", 2), ("image too small", 2)]


def test_limits_follow_the_settings_and_the_stored_size(tmp_path):
    from ml.images import image_limits

    delivery = _land(tmp_path, {"big.png": _noise(60, 60), "mid.png": _noise(40, 40, seed=1),
                                "long.png": _noise(60, 150, seed=2)})
    # auto: a quarter of the stored size, so 40 px images are kept at 128 px and refused at 224 px
    assert image_limits(128).min_side == 32 and image_limits(224).min_side == 56
    assert image_limits(None).min_side == image_limits(16).min_side == 8  # never under 8 px
    result = ingest_delivery(delivery, ("cat", "dog"), 224, 1)
    assert result.quarantine["reason"].tolist() == ["image too small (40x40 px; min_image_side 56 px)"]
    chosen = image_limits(224, min_image_side=40, max_aspect_ratio=2.5)
    result = ingest_delivery(delivery, ("cat", "dog"), 224, 1, chosen)
    assert result.accepted["image"].tolist() == ["big.png", "mid.png", "long.png"]
    result = ingest_delivery(delivery, ("cat", "dog"), 224, 1, image_limits(224, 40, 2.4))
    assert result.quarantine["reason"].tolist() == ["extreme aspect ratio (2.5:1, 150x60 px; max_aspect_ratio 2.4)"]


def test_tiny_or_elongated_images_do_not_set_the_inferred_size(tmp_path):
    from ml.delivery import infer_format

    images = {"dot.png": _noise(1, 1), "banner.png": _noise(10, 300, seed=1), "icon.png": _noise(12, 12, seed=2)}
    images.update({f"{i}.png": _noise(28, 28, seed=10 + i) for i in range(3)})
    assert infer_format(_land(tmp_path / "mixed", images)) == (28, 1)
    tiny = _land(tmp_path / "tiny", {"dot.png": _noise(1, 1, 3), "speck.png": _noise(3, 5, 3)})
    with pytest.raises(DeliveryError, match="no usable image to infer the image size from"):
        infer_format(tiny)
