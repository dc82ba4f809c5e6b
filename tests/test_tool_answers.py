"""Answers from Label Studio's JSON export and CVAT's "CVAT for images 1.1" XML, dropped into checks/:
validated and quarantined as CSV answers are, with the tools' own cases (skipped, not answered)."""

import json
import xml.etree.ElementTree as ElementTree

import numpy as np
import pandas as pd

from ml import cvat, labelstudio
from ml.check_plan import answer_file_rows, answers_fingerprint
from ml.checks import read_checks

CLASSES = ("cat", "dog", "T-shirt/top")
IDS = pd.Index(["a/1.png", "a/2.png", "b/3.png", "b/4.jpg", "c/5.png"])


def _annotation(choices, cancelled=False, user=7, at="2026-12-01T10:00:00Z"):
    """One annotation as Label Studio 1.23's JSON export writes it (fields it adds and we do not read left out)."""
    return {"id": 1, "completed_by": user, "was_cancelled": cancelled, "ground_truth": False,
            "created_at": at, "updated_at": at, "lead_time": 3.2,
            "result": [] if choices is None else [{"from_name": "true_labels", "to_name": "image", "type": "choices",
                                                   "value": {"choices": choices}, "origin": "manual"}]}


def _task(task_id, image_id, *annotations):
    data = {"image": f"/data/local-files/?d=checks-plan-001/images/{task_id:05d}.png", "plan": 1}
    if image_id is not None:
        data["image_id"] = image_id
    return {"id": task_id, "data": data, "annotations": list(annotations), "predictions": [], "drafts": []}


def test_label_studio_answers_are_read_and_every_bad_case_is_quarantined_with_its_reason(tmp_path):
    folder = tmp_path / "checks"
    folder.mkdir()
    tasks = [
        _task(1, "a/1.png", _annotation(["cat"])),                                  # row 1: accepted
        _task(2, "a/2.png", _annotation(["dog", "T-shirt/top"], user={"id": 3, "email": "ann@example.com"})),
        _task(3, "b/3.png", _annotation(None, cancelled=True)),                     # row 3: skipped
        _task(4, "b/4.jpg"),                                                        # row 4: not answered
        _task(5, "c/5.png", _annotation([])),                                       # row 5: empty answer
        _task(6, "c/9.png", _annotation(["cat"])),                                  # row 6: unknown image
        _task(7, "c/5.png", _annotation(["zebra"])),                                # row 7: unknown class
        _task(8, None, _annotation(["cat"])),                                       # row 8: no image_id
        _task(9, "a/1.png", _annotation(["cat"]), _annotation(["dog"], user=8)),    # row 9: twice, twice again
    ]
    (folder / "ls-export.json").write_text(json.dumps(tasks))
    accepted, quarantine = read_checks(folder, CLASSES, IDS)
    assert accepted[["image_id", "true_labels", "checker", "row"]].values.tolist() == [
        ["a/1.png", "cat", "label-studio user 7", 1], ["a/2.png", "dog|T-shirt/top", "ann@example.com", 2]]
    assert accepted["checked_at"].tolist() == ["2026-12-01T10:00:00Z"] * 2
    reasons = dict(zip(zip(quarantine["row"], quarantine["key"]), quarantine["reason"]))
    assert reasons[(3, "b/3.png")] == "skipped in Label Studio"
    assert reasons[(4, "b/4.jpg")] == "not answered"
    assert reasons[(5, "c/5.png")] == "empty answer"
    assert reasons[(6, "c/9.png")] == "unknown image id 'c/9.png'"
    assert reasons[(7, "c/5.png")] == "unknown class 'zebra'"
    assert reasons[(8, "")].startswith("task 8 has no image_id")
    twice = quarantine[quarantine["row"] == 9]["reason"].tolist()
    assert twice == ["already checked in ls-export.json row 1",
                     "checked again in ls-export.json row 1 with another answer (cat)"]
    # nothing is lost: every answer and every rejected task is in exactly one of the two
    assert len(accepted) + len(quarantine) == answer_file_rows(folder, "image_id") == 10


def test_a_file_that_is_not_a_label_studio_export_is_quarantined_whole(tmp_path):
    folder = tmp_path / "checks"
    folder.mkdir()
    (folder / "broken.json").write_text('{"not": "a list"}')
    (folder / "truncated.json").write_text('[{"id": 1, "data": ')
    accepted, quarantine = read_checks(folder, CLASSES, IDS)
    assert accepted.empty and quarantine["row"].tolist() == [0, 0]
    assert "broken.json: not a Label Studio JSON export (expected a list of tasks)" in quarantine["reason"].iloc[0]
    assert quarantine["reason"].iloc[1].startswith("truncated.json: not a Label Studio JSON export")
    assert answer_file_rows(folder, "image_id") == 2


# A "CVAT for images 1.1" file laid out as CVAT's documentation of the format shows it (docs.cvat.ai,
# "XML annotation format", version 1.1: <meta><task>... <owner>, <dumped>, then one <image> per frame
# with its <tag label=... source=...> elements), for images exported by vendor-audit (names from
# cvat.image_name: the image id, ".png" appended unless it ends so).
CVAT_XML = """<?xml version="1.0" encoding="utf-8"?>
<annotations>
  <version>1.1</version>
  <meta>
    <task>
      <id>12</id>
      <name>checks-plan-001</name>
      <size>6</size>
      <mode>annotation</mode>
      <overlap>0</overlap>
      <bugtracker></bugtracker>
      <created>2026-12-01 09:00:00.000000+00:00</created>
      <updated>2026-12-01 11:00:00.000000+00:00</updated>
      <labels>
        <label><name>cat</name><type>tag</type><attributes></attributes></label>
        <label><name>dog</name><type>tag</type><attributes></attributes></label>
        <label><name>T-shirt/top</name><type>tag</type><attributes></attributes></label>
      </labels>
      <owner><username>checker1</username><email>checker1@example.com</email></owner>
    </task>
    <dumped>2026-12-01 11:05:00.000000+00:00</dumped>
  </meta>
  <image id="0" name="a/1.png" width="112" height="112">
    <tag label="cat" source="manual">
    </tag>
  </image>
  <image id="1" name="a/2.png" width="112" height="112">
    <tag label="dog" source="manual">
    </tag>
    <tag label="T-shirt/top" source="manual">
    </tag>
  </image>
  <image id="2" name="b/3.png" width="112" height="112">
  </image>
  <image id="3" name="b/4.jpg.png" width="112" height="112">
    <tag label="zebra" source="manual">
    </tag>
  </image>
  <image id="4" name="c/5.png" width="112" height="112">
    <tag label="cat" source="manual">
    </tag>
  </image>
  <image id="5" name="c/5.png" width="112" height="112">
    <tag label="dog" source="manual">
    </tag>
  </image>
</annotations>
"""


def test_cvat_answers_are_read_by_image_name_and_bad_images_are_quarantined(tmp_path):
    folder = tmp_path / "checks"
    folder.mkdir()
    (folder / "cvat-task-12.xml").write_text(CVAT_XML)
    accepted, quarantine = read_checks(folder, CLASSES, IDS)
    assert accepted[["image_id", "true_labels", "checker", "row"]].values.tolist() == [
        ["a/1.png", "cat", "checker1", 1], ["a/2.png", "dog|T-shirt/top", "checker1", 2], ["c/5.png", "cat", "checker1", 5]]
    assert (accepted["checked_at"] == "2026-12-01 11:05:00.000000+00:00").all()
    assert quarantine[["row", "key", "reason"]].values.tolist() == [
        [3, "b/3.png", "not answered (no tag on the image)"],
        [4, "b/4.jpg", "unknown class 'zebra'"],  # the name with .png appended maps back to its image
        [6, "c/5.png", "checked again in cvat-task-12.xml row 5 with another answer (cat)"]]
    assert len(accepted) + len(quarantine) == answer_file_rows(folder, "image_id")


def test_a_cvat_video_export_or_other_xml_is_quarantined_whole(tmp_path):
    folder = tmp_path / "checks"
    folder.mkdir()
    (folder / "video.xml").write_text('<annotations><version>1.1</version><track id="0" label="cat"/></annotations>')
    (folder / "other.xml").write_text("<dataset/>")
    (folder / "torn.xml").write_text("<annotations><image")
    _, quarantine = read_checks(folder, CLASSES, IDS)
    reasons = dict(zip(quarantine["file"], quarantine["reason"]))
    assert "export the task as 'CVAT for images 1.1'" in reasons["video.xml"]
    assert "its root is <dataset>" in reasons["other.xml"]
    assert reasons["torn.xml"].startswith("torn.xml: not a CVAT for images XML file")


def test_tool_exports_beside_csv_answers_change_the_fingerprint(tmp_path):
    folder = tmp_path / "checks"
    folder.mkdir()
    (folder / "a.csv").write_text("image_id,true_labels\na/1.png,cat\n")
    before = answers_fingerprint(folder)
    (folder / "ls.json").write_text(json.dumps([_task(1, "a/2.png", _annotation(["dog"]))]))
    after_json = answers_fingerprint(folder)
    (folder / "notes.txt").write_text("not an answer file")
    assert before != after_json == answers_fingerprint(folder)
    accepted, _ = read_checks(folder, CLASSES, IDS)
    assert accepted["image_id"].tolist() == ["a/1.png", "a/2.png"]


def test_the_labeling_config_and_tasks_hide_the_vendor_label_and_suggest_only_when_asked():
    config = ElementTree.fromstring(labelstudio.labeling_config(("cat", 'say "hi" & <go>')))
    choices = config.find("Choices")
    assert choices.get("choice") == "multiple" and choices.get("name") == labelstudio.CHOICES_NAME
    assert [c.get("value") for c in choices.findall("Choice")] == ["cat", 'say "hi" & <go>']
    tasks = labelstudio.check_tasks(["a/1.png"], ["/data/local-files/?d=x/images/1.png"], plan=2)
    assert tasks == [{"data": {"image": "/data/local-files/?d=x/images/1.png", "image_id": "a/1.png", "plan": 2}}]
    suggested = labelstudio.check_tasks(["a/1.png"], ["u"], plan=2, suggestions=["dog"])
    assert suggested[0]["predictions"][0]["result"][0]["value"] == {"choices": ["dog"]}
    relabel = labelstudio.relabel_tasks(["a/1.png"], ["u"], ["cat"], ["dog"], [0.93], vendor="a")
    assert relabel[0]["predictions"][0]["result"][0]["value"] == {"choices": ["cat"]}
    assert relabel[0]["data"]["given_label"] == "cat" and relabel[0]["data"]["suggested_label"] == "dog"


def test_cvat_annotations_written_for_a_task_read_back_as_the_same_answers(tmp_path):
    names = [cvat.image_name(i) for i in ["a/1.png", "b/4.jpg"]]
    assert names == ["a/1.png", "b/4.jpg.png"]
    text = cvat.annotations_xml(names, [(112, 112)] * 2, [["cat"], ["dog", "cat"]], CLASSES, "relabel a")
    (tmp_path / "pre.xml").write_text(text)
    answers, quarantined = cvat.read_export(tmp_path / "pre.xml", set(IDS))
    assert [(a["image_id"], a["true_labels"]) for a in answers] == [("a/1.png", "cat"), ("b/4.jpg", "dog|cat")]
    assert quarantined == []
    assert [label["name"] for label in json.loads(cvat.labels_json(CLASSES))] == list(CLASSES)
    assert np.all([label["type"] == "tag" for label in json.loads(cvat.labels_json(CLASSES))])
