import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ml.delivery import (
    Delivery, DeliveryError, find_ready_deliveries, ingest_delivery, load_curated, read_labels_csv, write_curated,
)
from ml.images import decode_image

CLASSES = ("cat", "dog")


def _delivery(tmp_path, rows, images):
    folder = tmp_path / "landing" / "v1" / "b1"
    folder.mkdir(parents=True)
    for name, image in images.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(image, bytes):
            path.write_bytes(image)
        else:
            image.save(path)
    pd.DataFrame(rows, columns=["image", "label"]).to_csv(folder / "labels.csv", index=False)
    (folder / "_READY").write_text("")
    return Delivery("v1", "b1", folder)


def test_every_row_is_accepted_or_quarantined_with_a_reason(tmp_path):
    good = Image.fromarray(np.full((10, 10), 200, np.uint8))
    other = Image.fromarray(np.full((10, 10), 100, np.uint8))
    png = (tmp_path / "x.png")
    good.save(png)
    truncated = png.read_bytes()[:40]
    (tmp_path / "secret.png").write_bytes(png.read_bytes())
    delivery = _delivery(tmp_path, [
        ("ok.png", "cat"),
        ("ok2.png", " DOG "),          # case and spaces are normalised
        ("ok.png", "dog"),             # duplicate row
        ("bird.png", "bird"),          # unknown class
        ("ok3.png", ""),               # empty label
        ("../../../../secret.png", "cat"),
        ("/etc/passwd", "cat"),
        ("missing.png", "cat"),
        ("broken.png", "cat"),
        ("text.png", "dog"),
        ("empty.png", "dog"),
        ("copy.png", "dog"),           # the content of ok.png again, another label
    ], {"ok.png": good, "ok2.png": other, "bird.png": good, "ok3.png": good, "broken.png": truncated,
        "text.png": b"hello, not an image", "empty.png": b"", "copy.png": good})
    result = ingest_delivery(delivery, CLASSES, 8, 1)
    assert result.reconciles and result.n_delivered == 12
    assert list(result.accepted["label"]) == ["cat", "dog"]
    assert result.images.shape == (2, 8, 8, 1) and result.images.dtype == np.uint8
    reasons = dict(zip(result.quarantine["row"], result.quarantine["reason"]))
    assert reasons[3].startswith("duplicate image row")
    assert reasons[4] == "unknown class 'bird'"
    assert reasons[5] == "empty label"
    assert reasons[6] == reasons[7] == "image path leaves the batch folder"
    assert reasons[8] == "image file not found"
    assert "image" in reasons[9] and "image" in reasons[10]
    assert reasons[11] == "empty file (0 bytes)"
    assert reasons[12] == "same image content as row 1, with another label (cat)"
    assert result.accepted["image_id"].tolist() == ["v1/b1/ok.png", "v1/b1/ok2.png"]


def test_symlink_leaving_the_batch_is_refused(tmp_path):
    outside = tmp_path / "outside.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(outside)
    delivery = _delivery(tmp_path, [("link.png", "cat")], {})
    (delivery.folder / "link.png").symlink_to(outside)
    result = ingest_delivery(delivery, CLASSES, 4, 1)
    assert len(result.accepted) == 0 and result.quarantine["reason"].tolist() == ["image path leaves the batch folder"]


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "CMYK"])
def test_image_modes_become_uint8_of_the_configured_shape(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8))
    image = rgb.convert(mode) if mode != "I;16" else Image.fromarray(np.full((12, 20), 40000, np.uint16))
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    for channels in (1, 3):
        array = decode_image(path, 16, channels)
        assert array.shape == (16, 16, channels) and array.dtype == np.uint8
    if mode == "I;16":
        assert decode_image(path, 16, 1).mean() == pytest.approx(40000 / 65535 * 255, abs=1)


def test_labels_csv_errors_name_the_file(tmp_path):
    path = tmp_path / "labels.csv"
    with pytest.raises(DeliveryError, match="labels.csv is missing"):
        read_labels_csv(path)
    path.write_text("file,class\na.png,cat\n")
    with pytest.raises(DeliveryError, match=r"labels.csv: missing required column\(s\) image, label"):
        read_labels_csv(path)
    path.write_bytes(b"image,label\na.png,caf\xe9\n")
    with pytest.raises(DeliveryError, match="line 2: not UTF-8"):
        read_labels_csv(path)


def test_labels_csv_with_bom_quotes_and_blank_lines(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes('\ufeffimage,label,annotator\n"a,1.png",cat,"x\ny"\n\nb.png,dog,z\n'.encode())
    frame = read_labels_csv(path)
    assert frame["image"].tolist() == ["a,1.png", "b.png"]
    assert frame["row"].tolist() == [1, 3]


def test_only_complete_deliveries_with_valid_names_are_found(tmp_path):
    landing = tmp_path / "landing"
    for vendor, batch, ready in [("a", "b1", True), ("a", "b2", False), ("bad.name", "b1", True), ("c", "b 1", True)]:
        (landing / vendor / batch).mkdir(parents=True)
        if ready:
            (landing / vendor / batch / "_READY").write_text("")
    assert [d.key for d in find_ready_deliveries(landing)] == ["a.b1"]


def test_curated_storage_round_trip(tmp_path):
    image = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4))
    delivery = _delivery(tmp_path, [("a.png", "cat"), ("b.png", "bird")], {"a.png": image})
    result = ingest_delivery(delivery, CLASSES, 4, 1)
    write_curated(tmp_path / "curated", tmp_path / "quarantine", delivery, result)
    rows, images = load_curated(tmp_path / "curated")
    assert rows["image_id"].tolist() == ["v1/b1/a.png"]
    np.testing.assert_array_equal(images[0, :, :, 0], np.arange(16).reshape(4, 4))
    assert pd.read_csv(tmp_path / "quarantine" / "v1" / "b1.csv")["reason"].tolist() == ["unknown class 'bird'"]


def test_fingerprint_changes_when_a_delivered_file_changes(tmp_path):
    from ml.delivery import changed_deliveries

    image = Image.fromarray(np.zeros((4, 4), np.uint8))
    delivery = _delivery(tmp_path, [("a.png", "cat")], {"a.png": image})
    result = ingest_delivery(delivery, CLASSES, 4, 1)
    write_curated(tmp_path / "curated", tmp_path / "quarantine", delivery, result)
    assert changed_deliveries(tmp_path / "landing", tmp_path / "curated") == []
    Image.fromarray(np.ones((4, 5), np.uint8)).save(delivery.folder / "a.png")
    assert changed_deliveries(tmp_path / "landing", tmp_path / "curated") == ["v1.b1"]


def test_same_content_across_deliveries_is_kept_and_marked_as_a_duplicate(tmp_path):
    from ml.delivery import duplicate_of

    rows = pd.DataFrame({"image_id": ["a/b1/x.png", "a/b1/y.png", "c/b9/z.png"], "sha256": ["h1", "h2", "h1"]})
    assert duplicate_of(rows).tolist() == ["", "", "a/b1/x.png"]
