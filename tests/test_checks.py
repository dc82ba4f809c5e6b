"""Hand-check answers and gold files: every row accepted or quarantined with its reason, on real files."""

import csv
import hashlib
import io

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ml.checks import (
    CHECK_COLUMNS, CHECK_QUARANTINE_COLUMNS, GOLD_COLUMNS, gold_checks, label_in_set, parse_label_set,
    read_checks, read_gold, write_check_quarantine,
)
from ml.delivery import Delivery, ingest_delivery

CLASSES = ("cat", "dog", "Bird")
IDS = {"v/b/1.png", "v/b/2.png", "v/b/3.png", "w/c/1.png"}
DIGEST_A, DIGEST_B = "a" * 64, "0123456789abcdef" * 4


def write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def reasons(quarantine: pd.DataFrame) -> dict[tuple[str, int], str]:
    return {(f, r): reason for f, r, reason in zip(quarantine["file"], quarantine["row"], quarantine["reason"])}


def assert_nothing_lost(accepted, quarantine, expected: set[tuple[str, int]]):
    """Each (file, row) read is in exactly one of the two frames."""
    places = list(zip(accepted["file"], accepted["row"])) + list(zip(quarantine["file"], quarantine["row"]))
    assert len(places) == len(set(places)), "a row is in both frames or twice"
    assert set(places) == expected


# ---- label sets ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, canonical", [
    ("cat", "cat"),
    ("  DOG ", "dog"),
    ("bird", "Bird"),
    ("dog|cat", "cat|dog"),
    (" Bird | cat|CAT |dog", "cat|dog|Bird"),
])
def test_label_sets_are_stored_canonically(text, canonical):
    assert parse_label_set(text, CLASSES) == canonical


@pytest.mark.parametrize("text, reason", [
    ("", "empty answer"),
    ("  ", "empty answer"),
    (" | ", "empty answer"),
    ("cat|", "empty class name in 'cat|'"),
    ("cta", "unknown class 'cta'"),
    ("cat| cta |fish|cta", "unknown classes 'cta', 'fish'"),
])
def test_bad_label_sets_say_why(text, reason):
    with pytest.raises(ValueError) as error:
        parse_label_set(text, CLASSES)
    assert str(error.value) == reason


def test_a_class_holding_the_separator_is_refused():
    with pytest.raises(ValueError, match="separates the classes"):
        parse_label_set("cat", ("cat", "dog|wolf"))


def test_label_in_set_with_multi_label_sets():
    given = pd.Series(["cat", "dog", "Bird", "cat", "dog", None])
    true_labels = np.array(["cat|dog", "cat|dog", "cat", "dog|Bird", "dog", "cat"], dtype=object)
    assert label_in_set(given, true_labels).tolist() == [True, True, False, False, True, False]
    assert label_in_set(np.array([], dtype=object), np.array([], dtype=object)).shape == (0,)
    with pytest.raises(ValueError, match="aligned"):
        label_in_set(np.array(["cat"]), np.array(["cat", "dog"]))


# ---- answer files ----------------------------------------------------------------------------------

def test_answers_are_accepted_normalised_or_quarantined_with_the_reason(tmp_path):
    folder = tmp_path / "checks"
    write(folder / "round1.csv",
          "image_id,true_labels,checker,checked_at\n"
          " v/b/1.png , CAT ,ann , 2024-05-01\n"      # 1 accepted, spaces and case normalised
          "v/b/2.png,dog|cat,bob,\n"                   # 2 accepted, a plausible set
          "v/b/9.png,cat,bob,\n"                       # 3 unknown image id
          ",cat,bob,\n"                                # 4 empty image id
          "v/b/3.png,fish,bob,\n"                      # 5 unknown class
          "v/b/3.png,,bob,\n"                          # 6 empty answer
          "v/b/1.png,cat,bob,\n"                       # 7 same answer again
          "v/b/2.png,dog,bob,\n")                      # 8 another answer
    accepted, quarantine = read_checks(folder, CLASSES, IDS)
    assert list(accepted.columns) == CHECK_COLUMNS and list(quarantine.columns) == CHECK_QUARANTINE_COLUMNS
    assert accepted.to_dict("records") == [
        {"image_id": "v/b/1.png", "true_labels": "cat", "checker": "ann", "checked_at": "2024-05-01",
         "file": "round1.csv", "row": 1},
        {"image_id": "v/b/2.png", "true_labels": "cat|dog", "checker": "bob", "checked_at": "",
         "file": "round1.csv", "row": 2},
    ]
    assert reasons(quarantine) == {
        ("round1.csv", 3): "unknown image id 'v/b/9.png'",
        ("round1.csv", 4): "empty image id",
        ("round1.csv", 5): "unknown class 'fish'",
        ("round1.csv", 6): "empty answer",
        ("round1.csv", 7): "already checked in round1.csv row 1",
        ("round1.csv", 8): "checked again in round1.csv row 2 with another answer (cat|dog)",
    }
    # quarantined rows keep what was written
    assert quarantine.set_index("row").loc[5, ["key", "true_labels"]].tolist() == ["v/b/3.png", "fish"]
    assert_nothing_lost(accepted, quarantine, {("round1.csv", r) for r in range(1, 9)})


def test_answers_across_files_keep_the_first_in_file_name_order(tmp_path):
    folder = tmp_path / "checks"
    write(folder / "b.csv", "image_id,true_labels\nv/b/1.png,cat\nv/b/2.png,Bird|dog\nw/c/1.png,dog\n")
    write(folder / "a.csv", "image_id,true_labels\nv/b/1.png,cat\nv/b/2.png,dog\n")
    write(folder / "notes.txt", "not an answer file")
    accepted, quarantine = read_checks(folder, CLASSES, pd.Index(sorted(IDS)))
    assert accepted[["image_id", "true_labels", "file", "row"]].values.tolist() == [
        ["v/b/1.png", "cat", "a.csv", 1], ["v/b/2.png", "dog", "a.csv", 2], ["w/c/1.png", "dog", "b.csv", 3]]
    assert reasons(quarantine) == {
        ("b.csv", 1): "already checked in a.csv row 1",
        ("b.csv", 2): "checked again in a.csv row 2 with another answer (dog)",
    }


def test_bom_crlf_quotes_and_blank_lines(tmp_path):
    folder = tmp_path / "checks"
    write(folder / "x.csv", b'\xef\xbb\xbf Image_ID ,"TRUE_LABELS"\r\n"v/b/1.png","cat|\r\ndog"\r\n\r\n'
                            b'"v/b/2.png"," bird "\r\n')
    accepted, quarantine = read_checks(folder, CLASSES, IDS)
    assert quarantine.empty
    assert accepted[["image_id", "true_labels", "row"]].values.tolist() == [
        ["v/b/1.png", "cat|dog", 1], ["v/b/2.png", "Bird", 3]]


@pytest.mark.parametrize("content, reason", [
    (b"", "empty file"),
    (b"image_id;true_labels\nv/b/1.png;cat\n", "missing required column(s) image_id, true_labels"),
    (b"image_id,answer\nv/b/1.png,cat\n", "missing required column(s) true_labels"),
    (b"image_id,true_labels\nv/b/1.png,caf\xe9\n", "line 2: not UTF-8"),
    (b"image_id,true_labels\n" + b"x" * 200_000 + b",cat\n", "line 2: not valid CSV"),
])
def test_an_unusable_file_is_quarantined_whole_and_the_others_are_read(tmp_path, content, reason):
    folder = tmp_path / "checks"
    bad = write(folder / "bad.csv", content)
    write(folder / "good.csv", "image_id,true_labels\nv/b/1.png,cat\n")
    accepted, quarantine = read_checks(folder, CLASSES, IDS)
    assert accepted["image_id"].tolist() == ["v/b/1.png"]
    assert quarantine[["file", "row", "key", "true_labels"]].values.tolist() == [["bad.csv", 0, "", ""]]
    assert str(bad) in quarantine["reason"].iloc[0] and reason in quarantine["reason"].iloc[0]


def test_a_dangling_link_is_a_missing_file(tmp_path):
    folder = tmp_path / "checks"
    folder.mkdir()
    (folder / "gone.csv").symlink_to(tmp_path / "nowhere.csv")
    accepted, quarantine = read_checks(folder, CLASSES, IDS)
    assert accepted.empty and quarantine["row"].tolist() == [0]
    assert "gone.csv is missing" in quarantine["reason"].iloc[0]


def test_missing_folders_give_empty_frames(tmp_path):
    accepted, quarantine = read_checks(tmp_path / "none", CLASSES, IDS)
    assert accepted.empty and quarantine.empty
    assert list(accepted.columns) == CHECK_COLUMNS and list(quarantine.columns) == CHECK_QUARANTINE_COLUMNS
    gold, gold_quarantine = read_gold(tmp_path / "none", CLASSES)
    assert gold.empty and gold_quarantine.empty and list(gold.columns) == GOLD_COLUMNS


# ---- gold ----------------------------------------------------------------------------------------------

def test_gold_rows_are_validated(tmp_path):
    folder = tmp_path / "gold"
    write(folder / "g1.csv", "sha256,true_labels\n"
                             f" {DIGEST_A.upper()} ,Dog\n"         # 1 accepted, lower-cased
                             f"{DIGEST_B},cat|bird\n"              # 2 accepted, a set
                             f"{'g' * 64},cat\n"                   # 3 not hex
                             f"{'a' * 63},cat\n"                   # 4 too short
                             ",cat\n"                              # 5 empty digest
                             f"{'c' * 64},wolf\n"                  # 6 unknown class
                             f"{'c' * 64}, \n")                    # 7 empty answer
    write(folder / "g2.csv", f"sha256,true_labels\n{DIGEST_A},dog\n{DIGEST_B},cat\n")
    accepted, quarantine = read_gold(folder, CLASSES)
    assert list(accepted.columns) == GOLD_COLUMNS
    assert accepted.values.tolist() == [[DIGEST_A, "dog", "g1.csv", 1], [DIGEST_B, "cat|Bird", "g1.csv", 2]]
    assert reasons(quarantine) == {
        ("g1.csv", 3): f"bad sha256 digest {'g' * 64!r} (expected 64 hexadecimal characters)",
        ("g1.csv", 4): f"bad sha256 digest {'a' * 63!r} (expected 64 hexadecimal characters)",
        ("g1.csv", 5): "empty sha256",
        ("g1.csv", 6): "unknown class 'wolf'",
        ("g1.csv", 7): "empty answer",
        ("g2.csv", 1): "already checked in g1.csv row 1",
        ("g2.csv", 2): "checked again in g1.csv row 2 with another answer (cat|Bird)",
    }
    assert quarantine.set_index(["file", "row"]).loc[("g1.csv", 3), "key"] == "g" * 64
    assert_nothing_lost(accepted, quarantine, {("g1.csv", r) for r in range(1, 8)} | {("g2.csv", 1), ("g2.csv", 2)})


def test_a_gold_file_without_a_digest_column_is_quarantined_whole(tmp_path):
    path = write(tmp_path / "gold" / "g.csv", "image_id,true_labels\nv/b/1.png,cat\n")
    accepted, quarantine = read_gold(tmp_path / "gold", CLASSES)
    assert accepted.empty and quarantine["row"].tolist() == [0]
    assert quarantine["reason"].iloc[0] == (f"{path}: missing required column(s) sha256 "
                                            f"(header: image_id,true_labels)")


def test_gold_answers_reach_delivered_images_by_content(tmp_path):
    batch = tmp_path / "landing" / "v" / "b"
    batch.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(batch / "honey.png")
    Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(batch / "plain.png")
    # the same gold image delivered again by another vendor, under another name
    other = tmp_path / "landing" / "w" / "c"
    other.mkdir(parents=True)
    (other / "renamed.png").write_bytes((batch / "honey.png").read_bytes())
    write(batch / "labels.csv", "image,label\nhoney.png,cat\nplain.png,dog\n")
    write(other / "labels.csv", "image,label\nrenamed.png,dog\n")
    rows = pd.concat([ingest_delivery(Delivery(v, b, tmp_path / "landing" / v / b), CLASSES, 8, 1).accepted
                      for v, b in (("v", "b"), ("w", "c"))], ignore_index=True)
    honey = hashlib.sha256((batch / "honey.png").read_bytes()).hexdigest()
    unrelated = hashlib.sha256(b"an image nobody delivered").hexdigest()
    write(tmp_path / "gold" / "g.csv", f"sha256,true_labels\n{honey.upper()},cat|dog\n{unrelated},cat\n")
    gold, quarantine = read_gold(tmp_path / "gold", CLASSES)
    assert quarantine.empty
    answers = gold_checks(rows, gold)
    assert answers.values.tolist() == [["v/b/honey.png", "cat|dog"], ["w/c/renamed.png", "cat|dog"]]
    given = rows.set_index("image_id").loc[answers["image_id"], "label"]
    assert label_in_set(given, answers["true_labels"]).tolist() == [True, True]


def test_no_gold_gives_no_answers():
    rows = pd.DataFrame({"image_id": ["v/b/1.png"], "sha256": [DIGEST_A]})
    answers = gold_checks(rows, pd.DataFrame(columns=GOLD_COLUMNS))
    assert answers.empty and list(answers.columns) == ["image_id", "true_labels"]


# ---- quarantine files ---------------------------------------------------------------------------------

def test_quarantine_is_written_per_answer_file_and_stale_files_go(tmp_path):
    folder, quarantine_dir = tmp_path / "checks", tmp_path / "quarantine"
    write(folder / "a.csv", "image_id,true_labels\nv/b/1.png,fish\nv/b/2.png,cat\n")
    write(folder / "b.csv", b"image_id\n")
    _, quarantine = read_checks(folder, CLASSES, IDS)
    written = write_check_quarantine(quarantine_dir, "checks", quarantine)
    assert written == [quarantine_dir / "checks" / "a.csv", quarantine_dir / "checks" / "b.csv"]
    first = pd.read_csv(written[0], dtype=str, keep_default_na=False)
    assert list(first.columns) == CHECK_QUARANTINE_COLUMNS
    assert first.values.tolist() == [["a.csv", "1", "v/b/1.png", "fish", "unknown class 'fish'"]]

    # b.csv repaired, a.csv's bad row fixed: both quarantine files go, nothing else is touched
    write(folder / "a.csv", "image_id,true_labels\nv/b/1.png,cat\n")
    write(folder / "b.csv", "image_id,true_labels\n")
    write(quarantine_dir / "gold" / "g.csv", "kept")
    _, quarantine = read_checks(folder, CLASSES, IDS)
    assert write_check_quarantine(quarantine_dir, "checks", quarantine) == []
    assert sorted(p.name for p in quarantine_dir.rglob("*") if p.is_file()) == ["g.csv"]
    with pytest.raises(ValueError, match="kind"):
        write_check_quarantine(quarantine_dir, "answers", quarantine)


# ---- generated input ------------------------------------------------------------------------------------

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
image_id = st.sampled_from(sorted(IDS) + ["", " v/b/1.png ", "x.png"]) | text
label_set = st.lists(st.sampled_from(["cat", " DOG", "bird ", "fish", ""]) | text, min_size=1, max_size=3)
files = st.lists(st.lists(st.tuples(image_id, label_set.map("|".join), text), max_size=12), min_size=1, max_size=3)


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contents=files, crlf=st.booleans())
def test_every_written_answer_row_is_accepted_or_quarantined(tmp_path_factory, contents, crlf):
    folder = tmp_path_factory.mktemp("checks")
    expected = set()
    for number, rows in enumerate(contents):
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, lineterminator="\r\n" if crlf else "\n", quoting=csv.QUOTE_ALL)
        writer.writerow(["image_id", "true_labels", "checker"])
        writer.writerows(rows)
        write(folder / f"{number}.csv", buffer.getvalue())
        expected |= {(f"{number}.csv", i + 1) for i, row in enumerate(rows) if any(f.strip() for f in row)}
    accepted, quarantine = read_checks(folder, CLASSES, IDS)
    assert_nothing_lost(accepted, quarantine, expected)
    assert accepted["image_id"].is_unique and set(accepted["image_id"]) <= IDS
    assert all(parse_label_set(labels, CLASSES) == labels for labels in accepted["true_labels"])
    assert quarantine["reason"].str.len().gt(0).all()


csv_like_bytes = st.lists(st.sampled_from([b",", b'"', b"\r", b"\n", b"\r\n", b" ", b"|", b"cat", b"Dog", b"\xe9",
                                           DIGEST_A.encode(), DIGEST_B.upper().encode()]), max_size=40).map(b"".join)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300) | csv_like_bytes)
def test_random_bytes_never_break_the_reader(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("gold")
    path = write(folder / "g.csv", b"sha256,true_labels\n" + data)
    accepted, quarantine = read_gold(folder, CLASSES)
    whole = quarantine[quarantine["row"] == 0]
    if len(whole):  # rejected whole: nothing else from the file, and the reason names it
        assert len(quarantine) == 1 and accepted.empty and str(path) in whole["reason"].iloc[0]
    else:  # every non-blank record the csv module finds in the text is in exactly one frame
        records = csv.reader(io.StringIO(data.decode("utf-8"), newline=""))
        expected = {("g.csv", i) for i, fields in enumerate(records, start=1) if any(f.strip() for f in fields)}
        assert_nothing_lost(accepted, quarantine, expected)
        assert accepted["sha256"].str.fullmatch("[0-9a-f]{64}").all()
