"""CVAT's formats: an image archive and its tag labels out, "CVAT for images 1.1" answers back in.

A hand check in CVAT is an image-level tag: the checker puts one tag per class the image shows
(several: a plausible set). The images go out as PNG files named by their ``image_id`` (``.png``
appended unless it already ends so), so the names CVAT writes back map to the images; the labels go
out in the JSON CVAT's task form takes ("Raw" labels), all of type ``tag``. Relabelling tasks carry
the vendor's label as a pre-filled tag in an annotations file CVAT imports into the task.

The export read back is CVAT's own "CVAT for images 1.1" XML (docs.cvat.ai, "XML annotation
format"): every ``<image>`` becomes one answer row (its tags' labels), or one quarantined row with
the reason; the answers then go through the same validation as CSV answers (:mod:`ml.checks`).
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from ml.delivery import DeliveryError

IMAGE_SUFFIX = ".png"


def image_name(image_id: str) -> str:
    """The file name an image goes to CVAT by (a relative path: CVAT keeps the archive's folders)."""
    return image_id if image_id.lower().endswith(IMAGE_SUFFIX) else image_id + IMAGE_SUFFIX


def image_id_of(name: str, image_ids) -> str:
    """The ``image_id`` a CVAT image name stands for: the name itself where it is an image id, else the
    name without the ``.png`` :func:`image_name` appended (which may be unknown: validated later)."""
    if name in image_ids or not name.lower().endswith(IMAGE_SUFFIX):
        return name
    return name[:-len(IMAGE_SUFFIX)]


def labels_json(classes: tuple[str, ...]) -> str:
    """The task's labels as CVAT's task form takes them (Constructor > Raw): one tag label per class."""
    return json.dumps([{"name": name, "type": "tag", "attributes": []} for name in classes], indent=2)


def annotations_xml(names: list[str], sizes: list[tuple[int, int]], tags: list[list[str]],
                    classes: tuple[str, ...], task_name: str) -> str:
    """A "CVAT for images 1.1" annotations file: the images in order, each with its ``tags`` (labels
    given source "auto"), to import into a task made of the same images."""
    labels = "".join(f"<label><name>{escape(name)}</name><type>tag</type><attributes></attributes></label>"
                     for name in classes)
    lines = ['<?xml version="1.0" encoding="utf-8"?>', "<annotations>", "  <version>1.1</version>",
             f"  <meta><task><name>{escape(task_name)}</name><size>{len(names)}</size><mode>annotation</mode>"
             f"<labels>{labels}</labels></task></meta>"]
    for position, (name, (width, height), image_tags) in enumerate(zip(names, sizes, tags)):
        lines.append(f"  <image id=\"{position}\" name={quoteattr(name)} width=\"{width}\" height=\"{height}\">")
        lines.extend(f"    <tag label={quoteattr(label)} source=\"auto\"></tag>" for label in image_tags)
        lines.append("  </image>")
    lines.append("</annotations>")
    return "\n".join(lines) + "\n"


def read_export(path: Path, image_ids) -> tuple[list[dict], list[dict]]:
    """The answers in a "CVAT for images 1.1" annotations file, one per ``<image>`` (its 1-based
    position is its ``row``).

    Returns
    -------
    answers : list of dict
        ``image_id`` (:func:`image_id_of`), ``true_labels`` (the image's tag labels joined by ``|``,
        as written: validated like a CSV answer), ``checker`` (the task's assignee or owner, when the
        file names one), ``checked_at`` (when the file was dumped), ``row``.
    quarantined : list of dict
        ``row``, ``key``, ``true_labels``, ``reason``: an image with no tag (not answered), an image
        without a name.

    Raises
    ------
    DeliveryError
        The file is not XML or not CVAT's ``<annotations>`` (the caller quarantines it whole).
    """
    try:
        root = ElementTree.parse(path).getroot()
    except FileNotFoundError:
        raise DeliveryError(f"{path.name} is missing (a dangling link?)") from None
    except ElementTree.ParseError as exc:
        raise DeliveryError(f"{path.name}: not a CVAT for images XML file: {exc}") from None
    if root.tag != "annotations":
        raise DeliveryError(f"{path.name}: not a CVAT for images XML file (its root is <{root.tag}>, "
                            f"expected <annotations>)")
    if root.find("track") is not None:
        raise DeliveryError(f"{path.name}: a CVAT for video export; export the task as 'CVAT for images 1.1'")
    task = root.find("meta/task")
    task = root.find("meta/job") if task is None else task  # a job's export names its job
    checker = ""
    if task is not None:
        checker = (task.findtext("assignee/username") or task.findtext("owner/username") or "").strip()
    dumped = (root.findtext("meta/dumped") or "").strip()
    answers, quarantined = [], []
    for row, image in enumerate(root.iter("image"), start=1):
        name = (image.get("name") or "").strip()
        labels = "|".join(tag.get("label", "") for tag in image.findall("tag"))
        if not name:
            quarantined.append({"row": row, "key": "", "true_labels": labels, "reason": "image without a name"})
            continue
        image_id = image_id_of(name, image_ids)
        if not image.findall("tag"):
            quarantined.append({"row": row, "key": image_id, "true_labels": "",
                                "reason": "not answered (no tag on the image)"})
            continue
        answers.append({"image_id": image_id, "true_labels": labels, "checker": checker, "checked_at": dumped,
                        "row": row})
    return answers, quarantined
