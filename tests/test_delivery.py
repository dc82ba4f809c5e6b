import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ml.delivery import (
    Delivery, DeliveryError, find_ready_deliveries, ingest_delivery, load_curated, read_labels_csv, scan_landing,
    write_curated,
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
    good = Image.fromarray(np.arange(100, 200, dtype=np.uint8).reshape(10, 10))
    other = Image.fromarray(np.arange(100, dtype=np.uint8).reshape(10, 10))
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
    for vendor, batch, ready in [("a", "b1", True), ("a", "b2", False), ("bad.name", "b1", True), ("c", "b 1", True),
                                 ("Acme Corp", "b1", True)]:
        (landing / vendor / batch).mkdir(parents=True)
        if ready:
            (landing / vendor / batch / "_READY").write_text("")
    (landing / "notes.txt").write_text("not a delivery")
    (landing / "a" / "stray.csv").write_text("image,label\n")
    (landing / "linked").symlink_to(landing / "a")
    assert [d.key for d in find_ready_deliveries(landing)] == ["a.b1"]

    scan = scan_landing(landing)
    assert [d.key for d in scan.waiting] == ["a.b2"]  # waiting, not an error
    assert {(f.path, f.reason) for f in scan.ignored} == {
        ("Acme Corp", "name may only contain letters, digits, - and _"),
        ("bad.name", "name may only contain letters, digits, - and _"),
        ("c/b 1", "name may only contain letters, digits, - and _"),
        ("notes.txt", "a file where a vendor folder is expected"),
        ("a/stray.csv", "a file where a batch folder is expected"),
        ("linked", "a symlink where a vendor folder is expected (never followed)"),
    }


def test_images_keep_their_aspect_ratio_as_a_centred_square(tmp_path):
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # the centre 20 x 20: white; the outer quarters: black
    Image.fromarray(wide).save(tmp_path / "wide.png")
    square = decode_image(tmp_path / "wide.png", 10, 3)
    # squashed, the black quarters would fill half the square; cut from the centre, only the rim blends
    assert square.shape == (10, 10, 3) and square[1:-1, 1:-1].min() == 255 and square.mean() > 230


def test_photos_are_kept_at_their_shorter_side_up_to_224_px(tmp_path):
    from ml.delivery import infer_format

    photo = Image.fromarray(np.zeros((300, 400, 3), np.uint8))
    small = Image.fromarray(np.zeros((28, 28), np.uint8))
    assert infer_format(_delivery(tmp_path / "p", [("p.png", "cat")], {"p.png": photo})) == (224, 3)
    assert infer_format(_delivery(tmp_path / "s", [("s.png", "cat")], {"s.png": small})) == (28, 1)


def test_curated_images_are_memory_mapped_per_delivery_and_read_as_one(tmp_path):
    from ml.image_stack import ImageStack

    first = np.arange(3 * 2 * 2, dtype=np.uint8).reshape(3, 2, 2, 1)
    second = 100 + np.arange(2 * 2 * 2, dtype=np.uint8).reshape(2, 2, 2, 1)
    empty = np.zeros((0, 2, 2, 1), np.uint8)  # a delivery whose rows were all quarantined
    for name, array in (("first", first), ("empty", empty), ("second", second)):
        np.save(tmp_path / f"{name}.npy", array)
    stack = ImageStack.open([tmp_path / "first.npy", tmp_path / "empty.npy", tmp_path / "second.npy"])
    whole = np.concatenate([first, second])
    assert stack.shape == whole.shape and len(stack) == 5 and isinstance(stack.parts[0], np.memmap)
    np.testing.assert_array_equal(np.asarray(stack), whole)
    for index in (0, 4, -1, slice(1, 4), np.array([4, 0, 3]), whole[:, 0, 0, 0] % 2 == 0):
        np.testing.assert_array_equal(stack[index], whole[index])
    np.testing.assert_array_equal(stack[3, :, 1, 0], whole[3, :, 1, 0])
    np.testing.assert_array_equal(np.stack(list(stack)), whole)
    with pytest.raises(IndexError):
        stack[np.array([5])]


def test_curated_storage_round_trip(tmp_path):
    image = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    delivery = _delivery(tmp_path, [("a.png", "cat"), ("b.png", "bird")], {"a.png": image})
    result = ingest_delivery(delivery, CLASSES, 8, 1)
    write_curated(tmp_path / "curated", tmp_path / "quarantine", tmp_path / "state", delivery, result)
    rows, images = load_curated(tmp_path / "curated")
    assert rows["image_id"].tolist() == ["v1/b1/a.png"]
    np.testing.assert_array_equal(images[0, :, :, 0], np.arange(64).reshape(8, 8))
    assert pd.read_csv(tmp_path / "quarantine" / "v1" / "b1.csv")["reason"].tolist() == ["unknown class 'bird'"]
    # curated/ holds content only: the change-detection record lives in the state folder
    assert sorted(p.name for p in (tmp_path / "curated").rglob("*")) == ["b1", "images.npy", "rows.csv", "v1"]
    assert (tmp_path / "state" / "v1" / "b1.json").is_file()


def test_fingerprint_changes_when_a_delivered_file_changes(tmp_path):
    from ml.delivery import changed_deliveries

    image = Image.fromarray(np.zeros((4, 4), np.uint8))
    delivery = _delivery(tmp_path, [("a.png", "cat")], {"a.png": image})
    result = ingest_delivery(delivery, CLASSES, 4, 1)
    curated, state = tmp_path / "curated", tmp_path / "state"
    write_curated(curated, tmp_path / "quarantine", state, delivery, result)
    assert changed_deliveries(tmp_path / "landing", curated, state) == []
    Image.fromarray(np.ones((4, 5), np.uint8)).save(delivery.folder / "a.png")
    assert changed_deliveries(tmp_path / "landing", curated, state) == ["v1.b1"]


def _rewrite_byte_for_byte(folder, seconds_later: int) -> None:
    """Write every file of ``folder`` again with the same bytes and a later modification time."""
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        path.write_bytes(path.read_bytes())
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds_later * 10**9))


def test_a_delivery_rewritten_byte_for_byte_has_not_changed_but_new_bytes_have(tmp_path):
    from ml.delivery import changed_deliveries, delivery_fingerprint, read_state

    images = {"a.png": Image.fromarray(np.zeros((4, 4), np.uint8)), "b.png": Image.fromarray(np.full((4, 4), 9, np.uint8))}
    delivery = _delivery(tmp_path, [("a.png", "cat"), ("b.png", "dog")], images)
    curated, state, landing = tmp_path / "curated", tmp_path / "state", tmp_path / "landing"
    write_curated(curated, tmp_path / "quarantine", state, delivery, ingest_delivery(delivery, CLASSES, 4, 1))
    recorded = read_state(state, delivery)
    _rewrite_byte_for_byte(delivery.folder, seconds_later=60)
    assert delivery_fingerprint(delivery.folder) != recorded["fingerprint"]  # the fast path alone would say changed
    assert changed_deliveries(landing, curated, state) == []
    # the record takes the new times (the next check reads no image); what was read is unchanged
    refreshed = read_state(state, delivery)
    assert refreshed["fingerprint"] == delivery_fingerprint(delivery.folder)
    assert {k: v for k, v in refreshed.items() if k != "fingerprint"} == \
        {k: v for k, v in recorded.items() if k != "fingerprint"}
    # new pixels in one image: a change
    pixels = np.zeros((4, 4), np.uint8)
    pixels[0, 0] = 1
    Image.fromarray(pixels).save(delivery.folder / "a.png")
    assert changed_deliveries(landing, curated, state) == ["v1.b1"]


def test_a_home_made_before_records_moved_out_of_curated_still_detects_changes(tmp_path):
    import json

    from ml.delivery import changed_deliveries, delivery_content_digest, delivery_fingerprint, read_state

    image = Image.fromarray(np.zeros((4, 4), np.uint8))
    delivery = _delivery(tmp_path, [("a.png", "cat")], {"a.png": image})
    curated = tmp_path / "curated"
    write_curated(curated, tmp_path / "quarantine", tmp_path / "old-state", delivery, ingest_delivery(delivery, CLASSES, 4, 1))
    (curated / "v1" / "b1" / "delivery.json").write_text(json.dumps({
        "fingerprint": delivery_fingerprint(delivery.folder), "n_delivered": 1, "n_accepted": 1, "n_quarantined": 0}))
    assert changed_deliveries(tmp_path / "landing", curated, tmp_path / "state") == []
    # its files are as they were read: their content digest and a reading time are recorded now
    record = read_state(tmp_path / "state", delivery)
    assert record["content_digest"] == delivery_content_digest(delivery.folder) and record["ingested_at"]
    _rewrite_byte_for_byte(delivery.folder, seconds_later=60)
    assert changed_deliveries(tmp_path / "landing", curated, tmp_path / "state") == []
    (delivery.folder / "labels.csv").write_text("image,label\na.png,dog\n")
    assert changed_deliveries(tmp_path / "landing", curated, tmp_path / "state") == ["v1.b1"]


def test_unusable_labels_file_quarantines_the_delivery_whole(tmp_path):
    from ml.delivery import delivery_outcome, is_settled, reject_delivery, stamp_delivery

    delivery = _delivery(tmp_path, [("a.png", "cat")], {"a.png": Image.fromarray(np.zeros((4, 4), np.uint8))})
    (delivery.folder / "labels.csv").write_text("file,class\na.png,cat\n")
    curated, quarantine, state = tmp_path / "curated", tmp_path / "quarantine", tmp_path / "state"
    (curated / "v1" / "b1").mkdir(parents=True)
    (curated / "v1" / "b1" / ".images.npy.tmp-123").write_bytes(b"left by a killed run")
    with pytest.raises(DeliveryError) as error:
        ingest_delivery(delivery, CLASSES, 4, 1)
    reject_delivery(curated, quarantine, state, delivery, str(error.value), stamp_delivery(delivery.folder))
    row = pd.read_csv(quarantine / "v1" / "b1.csv", keep_default_na=False).to_dict(orient="records")
    assert row == [{"vendor": "v1", "batch": "b1", "row": 0, "image": "", "label": "", "reason": str(error.value)}]
    assert "labels.csv: missing required column(s) image, label" in row[0]["reason"]
    assert not (curated / "v1" / "b1").exists()  # nothing of it curated
    assert is_settled(delivery, curated, state)  # not read again at the next run
    outcome = delivery_outcome(delivery, quarantine, state, 0.05)
    assert outcome.status == "rejected" and outcome.check_failed and outcome.quarantine_share == 1.0


def test_outcome_counts_quarantine_reasons_alike(tmp_path):
    from ml.delivery import delivery_outcome

    good = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    delivery = _delivery(tmp_path, [("a.png", "cat"), ("a.png", "cat"), ("b.png", "cat"), ("b.png", "dog"),
                                    ("c.png", "bird"), ("d.png", "cat"), ("e.png", "cat")],
                         {"a.png": good, "b.png": Image.fromarray(np.arange(64, 128, dtype=np.uint8).reshape(8, 8))})
    result = ingest_delivery(delivery, CLASSES, 8, 1)
    write_curated(tmp_path / "curated", tmp_path / "quarantine", tmp_path / "state", delivery, result)
    outcome = delivery_outcome(delivery, tmp_path / "quarantine", tmp_path / "state", 0.05)
    assert (outcome.n_delivered, outcome.n_accepted, outcome.n_quarantined) == (7, 2, 5)
    assert outcome.top_reasons == [("duplicate image row", 2), ("image file not found", 2), ("unknown class 'bird'", 1)]
    assert outcome.check_failed and outcome.quarantine_share == pytest.approx(5 / 7)


def test_taxonomy_change_is_described_and_refused(tmp_path):
    from ml.delivery import TaxonomyChanged, check_taxonomy, describe_taxonomy_change, record_taxonomy

    assert describe_taxonomy_change(("cat", "dog"), ("cat", "dog")) == ""
    assert describe_taxonomy_change(("cat", "dog"), ("cat", "Dog")) == "renamed 'dog' -> 'Dog'"
    assert describe_taxonomy_change(("cat", "dog"), ("cat", "dog", "bird")) == "added 'bird'"
    assert describe_taxonomy_change(("cat", "dog", "bird"), ("cat", "bird")) == "removed 'dog'"
    assert "another order" in describe_taxonomy_change(("cat", "dog"), ("dog", "cat"))
    curated = tmp_path / "curated"
    check_taxonomy(curated, CLASSES)  # nothing curated yet: any list is fine
    record_taxonomy(curated, CLASSES)
    assert (curated / "taxonomy.json").read_text().count("cat") == 1
    check_taxonomy(curated, CLASSES)
    with pytest.raises(TaxonomyChanged, match=r"renamed 'dog' -> 'Dog'.*old list \['cat', 'dog'\].*new home"):
        check_taxonomy(curated, ("cat", "Dog"), "home/vendor-audit.yaml")


def test_same_content_across_deliveries_is_kept_and_marked_as_a_duplicate(tmp_path):
    from ml.delivery import duplicate_of

    rows = pd.DataFrame({"image_id": ["a/b1/x.png", "a/b1/y.png", "c/b9/z.png"], "vendor": ["a", "a", "c"],
                         "batch": ["b1", "b1", "b9"], "sha256": ["h1", "h2", "h1"]})
    arrivals = pd.DataFrame({"vendor": ["a", "c"], "batch": ["b1", "b9"],
                             "ingested_at": ["2025-03-01T14:30:00+00:00", "2025-03-01T15:01:00+00:00"],
                             "labeled_at": ["", ""]})
    assert duplicate_of(rows, arrivals).tolist() == ["", "", "a/b1/x.png"]


def _landed(landing, vendor: str, batch: str, images: dict, labeled_at: list[str] | None = None) -> Delivery:
    """A complete delivery of 8x8 grayscale PNGs (name -> pixel value, one corner brighter so that no
    image is blank), all labelled cat."""
    folder = landing / vendor / batch
    folder.mkdir(parents=True)
    for name, value in images.items():
        pixels = np.full((8, 8), value, np.uint8)
        pixels[0, 0] = value + 100
        Image.fromarray(pixels).save(folder / name)
    labels = pd.DataFrame({"image": list(images), "label": "cat"})
    if labeled_at is not None:
        labels["labeled_at"] = labeled_at
    labels.to_csv(folder / "labels.csv", index=False)
    (folder / "_READY").write_text("")
    return Delivery(vendor, batch, folder)


def test_the_first_copy_of_a_repeated_image_is_the_one_ingested_first_whatever_the_names(tmp_path):
    from ml.delivery import arrival_order, duplicate_of, load_curated_rows

    landing, curated, quarantine, state = (tmp_path / n for n in ("landing", "curated", "quarantine", "state"))
    # b and c deliver first; a's second batch, ingested later, repeats one image of each
    early = [_landed(landing, "c", "batch-001", {"c1.png": 10, "c2.png": 20}),
             _landed(landing, "b", "batch-001", {"b1.png": 30})]
    for delivery in early:
        write_curated(curated, quarantine, state, delivery, ingest_delivery(delivery, CLASSES, 8, 1))
    late = _landed(landing, "a", "batch-002", {"again-c1.png": 10, "again-b1.png": 30, "new.png": 40})
    write_curated(curated, quarantine, state, late, ingest_delivery(late, CLASSES, 8, 1))
    rows = load_curated_rows(curated)  # in name order: a's copies come first
    arrivals = arrival_order(early + [late], curated, state)
    assert (arrivals["ingested_at"] != "").all() and arrivals["ingested_at"].is_monotonic_increasing
    first = dict(zip(rows["image_id"], duplicate_of(rows, arrivals)))
    assert first == {"a/batch-002/again-c1.png": "c/batch-001/c1.png", "a/batch-002/again-b1.png": "b/batch-001/b1.png",
                     "a/batch-002/new.png": "", "b/batch-001/b1.png": "", "c/batch-001/c1.png": "",
                     "c/batch-001/c2.png": ""}


def test_deliveries_read_at_the_same_time_are_ordered_by_labeled_at_then_by_name(tmp_path):
    from ml.delivery import arrival_order, duplicate_of, read_state

    landing, curated, state = tmp_path / "landing", tmp_path / "curated", tmp_path / "state"
    later = _landed(landing, "a", "b1", {"x.png": 10}, labeled_at=["2025-03-02 09:00"])
    earlier = _landed(landing, "z", "b1", {"x.png": 10}, labeled_at=["2025-03-01T18:00:00Z"])
    for delivery in (later, earlier):
        write_curated(curated, tmp_path / "quarantine", state, delivery, ingest_delivery(delivery, CLASSES, 8, 1))
    assert read_state(state, earlier)["labeled_at"] == "2025-03-01T18:00:00.000000+00:00"
    rows = pd.DataFrame({"image_id": ["a/b1/x.png", "z/b1/x.png", "m/b1/x.png"], "vendor": ["a", "z", "m"],
                         "batch": ["b1", "b1", "b1"], "sha256": ["h", "h", "h"]})
    arrivals = arrival_order([later, earlier], curated, state).assign(ingested_at="2025-03-03T00:00:00+00:00")
    tie = pd.DataFrame([{"vendor": "m", "batch": "b1", "ingested_at": "2025-03-03T00:00:00+00:00", "labeled_at": ""}])
    # the same reading time: the earliest labeled_at first, a delivery without one after those with one
    assert duplicate_of(rows, pd.concat([arrivals, tie])).tolist() == ["z/b1/x.png", "", "z/b1/x.png"]
    # tied on both: vendor and batch names decide
    same = pd.concat([arrivals, tie]).assign(labeled_at="")
    assert duplicate_of(rows, same).tolist() == ["", "a/b1/x.png", "a/b1/x.png"]


def test_annotator_names_are_kept_in_the_curated_rows(tmp_path):
    from ml.delivery import load_curated_rows

    images = {f"{i}.png": Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) + 40 * i) for i in range(3)}
    delivery = _delivery(tmp_path, [(name, "cat") for name in images], images)
    (delivery.folder / "labels.csv").write_text("label,annotator,image\ncat, ann ,0.png\ndog,,1.png\ncat,bo,2.png\n")
    curated = tmp_path / "curated"
    write_curated(curated, tmp_path / "quarantine", tmp_path / "state", delivery, ingest_delivery(delivery, CLASSES, 8, 1))
    rows = load_curated_rows(curated)
    assert rows["annotator"].tolist() == ["ann", "", "bo"] and rows["label"].tolist() == ["cat", "dog", "cat"]
    # rows curated before annotators were kept read as unnamed
    rows_file = curated / "v1" / "b1" / "rows.csv"
    pd.read_csv(rows_file).drop(columns="annotator").to_csv(rows_file, index=False)
    assert load_curated_rows(curated)["annotator"].tolist() == ["", "", ""]
