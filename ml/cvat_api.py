"""A CVAT server, behind the two calls the hand-check loop makes: create a task, fetch its answers.

:class:`CvatTasks` is that interface; :class:`CvatServer` implements it with ``cvat-sdk`` (CVAT's own
client). The rest of the loop (:func:`push_task`, :func:`pull_task`) is written against the interface,
so it runs the same against a server and against an in-memory stand-in where no server can run.

The token is a CVAT personal access token from the environment variable ``CVAT_ACCESS_TOKEN``, held only
in memory: it is never written, logged, or put in an error message.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ml.files import atomic_write_bytes, atomic_write_text

TOKEN_VARIABLE = "CVAT_ACCESS_TOKEN"
EXPORT_FORMAT = "CVAT for images 1.1"
IMPORT_FORMAT = "CVAT 1.1"
TASK_RECORD = "cvat-task.json"  # in an export's folder: the task it became on which server


class CvatError(RuntimeError):
    """The server could not be reached or refused a call (the message never holds the token)."""


class CvatTasks(Protocol):
    def create_task(self, name: str, labels: list[dict], archive: Path, annotations: Path | None) -> int:
        """Create a task of tag ``labels`` from the image ``archive`` (CVAT unpacks it), import
        ``annotations`` ("CVAT 1.1") into it where given, and return the task's id."""

    def annotations(self, task_id: int) -> bytes:
        """The task's annotations as CVAT exports them in "CVAT for images 1.1" (annotations.xml)."""


@dataclass(frozen=True)
class PushedTask:
    url: str
    task_id: int
    plan: int


class CvatServer:
    """:class:`CvatTasks` on a CVAT server, through cvat-sdk."""

    def __init__(self, url: str, token: str):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"cvat_url must start with http:// or https://, not {url!r}")
        if not token:
            raise ValueError(f"no CVAT token: set the environment variable {TOKEN_VARIABLE} (CVAT: your user "
                             f"menu > Settings > Personal access tokens)")
        from cvat_sdk import make_client

        self.url = url.rstrip("/")
        self._client = self._call("connect", lambda: make_client(self.url, access_token=token))

    def _call(self, what: str, call):
        from cvat_sdk.api_client.exceptions import ApiException

        try:
            return call()
        except ApiException as exc:  # its str() carries response headers and body: only the status goes out
            raise CvatError(f"CVAT at {self.url} answered {exc.status} {exc.reason} to {what}") from None
        except (OSError, ValueError) as exc:
            raise CvatError(f"CVAT at {self.url} could not {what}: {type(exc).__name__}") from None
        except Exception as exc:  # urllib3's connection errors are not OSErrors
            if type(exc).__module__.startswith("urllib3"):
                raise CvatError(f"CVAT at {self.url} could not be reached ({type(exc).__name__})") from None
            raise

    def create_task(self, name: str, labels: list[dict], archive: Path, annotations: Path | None) -> int:
        from cvat_sdk.api_client import models

        spec = models.TaskWriteRequest(name=name, labels=[models.PatchedLabelRequest(name=label["name"],
                                                                                     type=label["type"])
                                                          for label in labels])
        task = self._call("create the task", lambda: self._client.tasks.create_from_data(
            spec, resources=[str(archive)],
            annotation_path=str(annotations) if annotations else "", annotation_format=IMPORT_FORMAT))
        return int(task.id)

    def annotations(self, task_id: int) -> bytes:
        import tempfile

        task = self._call(f"find task {task_id}", lambda: self._client.tasks.retrieve(task_id))
        with tempfile.TemporaryDirectory() as scratch:
            archive = Path(scratch) / "export.zip"
            self._call(f"export task {task_id}", lambda: task.export_dataset(EXPORT_FORMAT, archive,
                                                                              include_images=False))
            return annotations_in(archive.read_bytes(), f"task {task_id}'s export")


def annotations_in(archive: bytes, what: str) -> bytes:
    """The ``annotations.xml`` of a CVAT export archive."""
    try:
        with zipfile.ZipFile(io.BytesIO(archive)) as zipped:
            return zipped.read("annotations.xml")
    except (zipfile.BadZipFile, KeyError):
        raise CvatError(f"{what} holds no annotations.xml (not a '{EXPORT_FORMAT}' export)") from None


def push_task(tasks: CvatTasks, url: str, folder: Path, plan: int) -> PushedTask:
    """Create a task from an export folder (:func:`ml.tool_export.cvat_export`: ``images.zip``,
    ``labels.json``, ``annotations.xml`` where pre-filled) and record it in ``folder/cvat-task.json``.

    An export already pushed to the same server is not pushed again (its recorded task is returned).
    """
    record = folder / TASK_RECORD
    if record.is_file():
        pushed = PushedTask(**json.loads(record.read_text()))
        if pushed.url == url:
            return pushed
    annotations = folder / "annotations.xml"
    task_id = tasks.create_task(folder.name, json.loads((folder / "labels.json").read_text()),
                                folder / "images.zip", annotations if annotations.is_file() else None)
    pushed = PushedTask(url, task_id, plan)
    atomic_write_text(record, json.dumps(pushed.__dict__) + "\n")
    return pushed


def pushed_tasks(exports: Path, url: str) -> list[PushedTask]:
    """The tasks recorded under ``exports`` (``cvat/*/cvat-task.json``) on the server at ``url``, by plan."""
    records = [PushedTask(**json.loads(path.read_text())) for path in sorted(exports.glob(f"cvat/*/{TASK_RECORD}"))]
    return sorted((r for r in records if r.url == url), key=lambda r: (r.plan, r.task_id))


def pull_task(tasks: CvatTasks, task_id: int, checks: Path) -> Path:
    """Write task ``task_id``'s "CVAT for images 1.1" annotations to ``checks/cvat-task-N.xml`` (atomically;
    a later pull of the same task replaces it) and return the path."""
    path = checks / f"cvat-task-{int(task_id)}.xml"
    atomic_write_bytes(path, tasks.annotations(task_id))
    return path
