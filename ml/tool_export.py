"""Task sets for the tools checkers and vendors work in: a folder per export, with the images, what
the tool imports, and a README.txt saying how.

Label Studio opens the images as local files (its ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` must be
a parent of the export: ``document_root``); CVAT takes an archive of the images, its labels as JSON
and, where labels are pre-filled, a "CVAT for images 1.1" annotations file. Every file is written
atomically; an export folder that exists is refused, so nothing a checker works from changes under them.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml import cvat, labelstudio
from ml.files import atomic_write_bytes, atomic_write_text
from ml.thumbnails import thumbnail_png, upscale

TOOLS = ("label-studio", "cvat")


class ExportExists(ValueError):
    """The export folder exists already: exports are never overwritten."""


@dataclass(frozen=True)
class ToolExport:
    folder: Path
    files: list[Path]
    instructions: str


def _png_files(image_ids: list[str], images: dict[str, np.ndarray]) -> tuple[list[bytes], list[tuple[int, int]]]:
    missing = [image_id for image_id in image_ids if image_id not in images]
    if missing:
        raise KeyError(f"no image for {len(missing)} image id(s), e.g. {missing[0]}")
    shapes = [upscale(images[image_id]).shape for image_id in image_ids]
    return [thumbnail_png(images[image_id]) for image_id in image_ids], [(s[1], s[0]) for s in shapes]


def _file_name(position: int, image_id: str) -> str:
    # readable, unique by position, and free of the '/' image ids may hold
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in image_id)[-60:]
    return f"{position:05d}-{safe}" + ("" if safe.lower().endswith(".png") else ".png")


def _new_folder(folder: Path) -> None:
    if folder.exists():
        raise ExportExists(f"{folder} exists already: exports are never overwritten (remove it, or export "
                           f"to another folder with --out)")


def label_studio_export(folder: Path, document_root: Path, classes: tuple[str, ...], image_ids: list[str],
                        images: dict[str, np.ndarray], tasks_for, what: str) -> ToolExport:
    """Write ``folder/images/*.png``, ``labeling_config.xml``, ``tasks.json`` and ``README.txt``.

    ``tasks_for(urls) -> list[dict]`` makes the tasks from the images' Label Studio URLs (in the order
    of ``image_ids``); ``folder`` must lie under ``document_root``.
    """
    _new_folder(folder)
    try:
        relative = folder.resolve().relative_to(document_root.resolve())
    except ValueError:
        raise ValueError(f"{folder} is not under Label Studio's document root {document_root}") from None
    pngs, _ = _png_files(image_ids, images)
    names = [_file_name(position, image_id) for position, image_id in enumerate(image_ids)]
    files = []
    for name, data in zip(names, pngs):
        atomic_write_bytes(folder / "images" / name, data)
        files.append(folder / "images" / name)
    urls = [labelstudio.local_file_url(f"{relative.as_posix()}/images/{name}") for name in names]
    atomic_write_text(folder / "labeling_config.xml", labelstudio.labeling_config(classes))
    atomic_write_text(folder / "tasks.json", json.dumps(tasks_for(urls), indent=1) + "\n")
    instructions = (
        f"{what} for Label Studio: {len(image_ids)} tasks.\n"
        f"1. Start Label Studio with local files served from the document root:\n"
        f"   LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true \\\n"
        f"   LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT={document_root.resolve()} label-studio start\n"
        f"2. Create a project; Settings > Labeling Interface > Code: paste labeling_config.xml.\n"
        f"3. Settings > Cloud Storage > Add Source Storage > Local files, absolute local path\n"
        f"   {(folder / 'images').resolve()} (Save, do not sync: the tasks name the images).\n"
        f"4. Import tasks.json (Import > Upload files).\n")
    files += [folder / "labeling_config.xml", folder / "tasks.json"]
    return ToolExport(folder, files, instructions)


def cvat_export(folder: Path, classes: tuple[str, ...], image_ids: list[str], images: dict[str, np.ndarray],
                prefilled: list[list[str]] | None, what: str) -> ToolExport:
    """Write ``folder/images.zip`` (PNG files named by :func:`ml.cvat.image_name`), ``labels.json``, and
    with ``prefilled`` tags per image ``annotations.xml``; and ``README.txt``."""
    _new_folder(folder)
    pngs, sizes = _png_files(image_ids, images)
    names = [cvat.image_name(image_id) for image_id in image_ids]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zipped:  # PNG is compressed already
        for name, data in zip(names, pngs):
            zipped.writestr(name, data)
    atomic_write_bytes(folder / "images.zip", archive.getvalue())
    atomic_write_text(folder / "labels.json", cvat.labels_json(classes) + "\n")
    files = [folder / "images.zip", folder / "labels.json"]
    steps = (f"{what} for CVAT: {len(image_ids)} images.\n"
             f"1. Create a task; Labels > Raw: paste labels.json (one tag label per class).\n"
             f"2. Select files: images.zip. Submit.\n")
    if prefilled is not None:
        atomic_write_text(folder / "annotations.xml",
                          cvat.annotations_xml(names, sizes, prefilled, classes, folder.name))
        files.append(folder / "annotations.xml")
        steps += "3. Actions > Upload annotations > CVAT 1.1: annotations.xml (the labels pre-filled).\n"
    return ToolExport(folder, files, steps)


def finish(export: ToolExport, answers_back: str) -> ToolExport:
    """Write the export's README.txt: its instructions and how the answers come back."""
    text = export.instructions + answers_back
    atomic_write_text(export.folder / "README.txt", text)
    return ToolExport(export.folder, export.files + [export.folder / "README.txt"], text)
