"""Label Studio's formats: a labeling config and tasks out, its JSON export of answers back in.

A hand-check task shows one image and asks for every class it shows (``<Choices choice="multiple">``:
a plausible set when the image truly shows more than one). The task's data carries the image's URL
and its ``image_id``, never the vendor's label, so it cannot sway the checker; the model's
suggestion is a pre-annotation only when asked for. Relabelling tasks for a vendor carry the vendor's
own label pre-filled, for the vendor to correct.

The export read back is Label Studio's own "JSON" export (a list of tasks, each with its
``annotations``): every task becomes one answer row, or one quarantined row with the reason
(not answered, skipped, no ``image_id``); the answers then go through the same validation as CSV
answers (:mod:`ml.checks`).
"""

from __future__ import annotations

import json
from pathlib import Path
from xml.sax.saxutils import quoteattr

from ml.delivery import DeliveryError

CHOICES_NAME = "true_labels"  # the <Choices> control's name: answers are read from it
IMAGE_NAME = "image"          # the <Image> object's name, and the task data key of its URL
LOCAL_FILES_PREFIX = "/data/local-files/?d="  # how Label Studio serves a file under its document root


def labeling_config(classes: tuple[str, ...], title: str = "Which classes does this image show?") -> str:
    """The labeling config (XML) of a hand-check or relabelling project: the image, and the classes
    as multiple choice (every class the image shows: a plausible set), one answer required."""
    choices = "\n".join(f"    <Choice value={quoteattr(name)}/>" for name in classes)
    return (f"<View>\n  <Header value={quoteattr(title)}/>\n"
            f"  <Image name=\"{IMAGE_NAME}\" value=\"${IMAGE_NAME}\" zoom=\"true\"/>\n"
            f"  <Choices name=\"{CHOICES_NAME}\" toName=\"{IMAGE_NAME}\" choice=\"multiple\" showInline=\"true\" "
            f"required=\"true\">\n{choices}\n  </Choices>\n</View>\n")


def local_file_url(relative_path: str) -> str:
    """The URL Label Studio serves a file by, given its path under the document root
    (``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``)."""
    return LOCAL_FILES_PREFIX + relative_path


def _choices_result(labels: list[str]) -> list[dict]:
    return [{"from_name": CHOICES_NAME, "to_name": IMAGE_NAME, "type": "choices", "value": {"choices": labels}}]


def check_tasks(image_ids: list[str], image_urls: list[str], plan: int,
                suggestions: list[str] | None = None, model_version: str = "") -> list[dict]:
    """Hand-check tasks, one per planned image, in plan order.

    Parameters
    ----------
    image_ids, image_urls : (M,) str
        The planned images and the URLs Label Studio opens them by.
    plan : int
        The check plan's number, kept in each task's data (``plan``).
    suggestions : (M,) str, optional
        The model's suggested class per image: added as a prediction (a pre-annotation the checker
        sees selected). Off by default: a suggestion sways the checker towards the model.
    """
    if len(image_ids) != len(image_urls) or (suggestions is not None and len(suggestions) != len(image_ids)):
        raise ValueError("image_ids, image_urls and suggestions must be aligned")
    tasks = []
    for position, (image_id, url) in enumerate(zip(image_ids, image_urls)):
        task = {"data": {IMAGE_NAME: url, "image_id": image_id, "plan": plan}}
        if suggestions is not None:
            task["predictions"] = [{"model_version": model_version or "vendor-audit",
                                    "result": _choices_result([suggestions[position]])}]
        tasks.append(task)
    return tasks


def relabel_tasks(image_ids: list[str], image_urls: list[str], given: list[str], suggestions: list[str],
                  p_error: list[float], vendor: str) -> list[dict]:
    """Relabelling tasks for a vendor: each flagged image with the vendor's own label pre-filled (a
    prediction named ``<vendor>-delivered``), and the model's suggestion and ``p_error`` in the data
    for the vendor to weigh."""
    tasks = []
    for image_id, url, label, suggested, p in zip(image_ids, image_urls, given, suggestions, p_error):
        tasks.append({"data": {IMAGE_NAME: url, "image_id": image_id, "vendor": vendor, "given_label": label,
                               "suggested_label": suggested, "p_error": round(float(p), 4)},
                      "predictions": [{"model_version": f"{vendor}-delivered", "result": _choices_result([label])}]})
    return tasks


def _checker(annotation: dict) -> str:
    who = annotation.get("completed_by")
    if isinstance(who, dict):  # some exports expand the user
        return str(who.get("email") or who.get("username") or who.get("id", ""))
    return f"label-studio user {who}" if who not in (None, "") else ""


def _chosen(annotation: dict) -> list[str]:
    chosen = []
    for item in annotation.get("result") or []:
        if item.get("type") == "choices" and item.get("from_name") == CHOICES_NAME:
            chosen.extend(str(name) for name in (item.get("value") or {}).get("choices") or [])
    return chosen


def read_export(path: Path, checkers: dict[int, str] | None = None) -> tuple[list[dict], list[dict]]:
    """The answers in a Label Studio JSON export, one per task (its 1-based position is its ``row``).

    Parameters
    ----------
    checkers : dict, optional
        Label Studio user id -> name (e.g. e-mail), to name the checker; otherwise
        ``label-studio user <id>``.

    Returns
    -------
    answers : list of dict
        ``image_id``, ``true_labels`` (the chosen classes joined by ``|``, as written: validated like a
        CSV answer), ``checker``, ``checked_at`` (the annotation's last update), ``row``. A task with
        several answers gives one row for each, in order; the first counts (the others are
        quarantined as checked again).
    quarantined : list of dict
        ``row``, ``key`` (the image id, "" if none), ``true_labels`` and ``reason``: a task not answered,
        an answer skipped (cancelled) in Label Studio, a task without ``image_id`` in its data.

    Raises
    ------
    DeliveryError
        The file is not UTF-8 JSON or not a list of tasks (the caller quarantines it whole).
    """
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DeliveryError(f"{path.name} is missing (a dangling link?)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeliveryError(f"{path.name}: not a Label Studio JSON export: {exc}") from None
    if not isinstance(tasks, list) or not all(isinstance(task, dict) for task in tasks):
        raise DeliveryError(f"{path.name}: not a Label Studio JSON export (expected a list of tasks)")
    checkers = checkers or {}
    answers, quarantined = [], []
    for row, task in enumerate(tasks, start=1):
        image_id = str((task.get("data") or {}).get("image_id", "")).strip()
        if not image_id:
            quarantined.append({"row": row, "key": "", "true_labels": "",
                                "reason": f"task {task.get('id', row)} has no image_id in its data "
                                          f"(not exported by vendor-audit checks export)"})
            continue
        annotations = task.get("annotations") or []
        if not annotations:
            quarantined.append({"row": row, "key": image_id, "true_labels": "", "reason": "not answered"})
            continue
        for annotation in annotations:
            labels = "|".join(_chosen(annotation))
            if annotation.get("was_cancelled"):
                quarantined.append({"row": row, "key": image_id, "true_labels": labels,
                                    "reason": "skipped in Label Studio"})
                continue
            who = annotation.get("completed_by")
            checker = checkers.get(who, _checker(annotation)) if isinstance(who, int) else _checker(annotation)
            answers.append({"image_id": image_id, "true_labels": labels, "checker": checker,
                            "checked_at": str(annotation.get("updated_at") or annotation.get("created_at") or ""),
                            "row": row})
    return answers, quarantined
