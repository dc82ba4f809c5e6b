"""Hand checks through a CVAT server: the plan pushed as a task, its answers pulled back, the audit re-scored.

CVAT's server needs containers this machine cannot run, so the loop runs against ``InMemoryCvat``, a
stand-in for the server's two calls behind :class:`ml.cvat_api.CvatTasks` (it keeps what a task is made of
and writes its export with the same "CVAT for images 1.1" writer the relabelling export uses). The cvat-sdk
adapter itself is run for real against HTTP servers on 127.0.0.1: one that refuses the token, and a port
nobody listens on.
"""

import contextlib
import http.server
import io
import os
import threading
import zipfile

import pandas as pd
import pytest
from PIL import Image

from conftest import make_home
from ml import cvat
from ml.config import load_settings
from ml.cvat_api import CvatError, CvatServer, annotations_in, pull_task, push_task, pushed_tasks
from pipelines.cli import main
from pipelines.servers import free_port

TOKEN = "cvat-pat-0123456789abcdef"


class InMemoryCvat:
    """A CVAT server's tasks as the two calls see them: images from the archive, tag labels, tags per image."""

    def __init__(self):
        self.tasks: dict[int, dict] = {}

    def create_task(self, name, labels, archive, annotations):
        with zipfile.ZipFile(archive) as zipped:
            names = zipped.namelist()
            sizes = [Image.open(io.BytesIO(zipped.read(n))).size for n in names]
        tags = {n: [] for n in names}
        if annotations is not None:
            for answer in cvat.read_export(annotations, set())[0]:
                tags[cvat.image_name(answer["image_id"])] = answer["true_labels"].split("|")
        task_id = len(self.tasks) + 1
        self.tasks[task_id] = {"name": name, "labels": tuple(label["name"] for label in labels),
                               "label_types": {label["type"] for label in labels}, "names": names,
                               "sizes": sizes, "tags": tags}
        return task_id

    def annotations(self, task_id):
        task = self.tasks[task_id]
        return cvat.annotations_xml(task["names"], task["sizes"], [task["tags"][n] for n in task["names"]],
                                    task["labels"], task["name"]).encode()


def _cli(argv, env=None):
    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return status, out.getvalue() + err.getvalue()


@contextlib.contextmanager
def refusing_server(seen: list):
    """An HTTP server on 127.0.0.1 that answers every request 401, as CVAT does to a revoked token."""

    class Refuse(http.server.BaseHTTPRequestHandler):
        def _refuse(self):
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"detail": "Invalid token."}')

        do_GET = do_POST = _refuse

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def planned_home(tmp_path_factory):
    home = make_home(tmp_path_factory.mktemp("cvat") / "home", {"a": 0.0, "b": 0.2}, per_vendor=90,
                     heads=("l2softmax",))
    assert _cli(["run", "--home", str(home)])[0] == 0
    assert _cli(["plan", "--home", str(home), "--budget", "6"])[0] == 0
    return home


def test_the_plan_pushed_to_cvat_comes_back_as_checks_that_rescore_the_audit(planned_home):
    home = planned_home
    to_check = pd.read_csv(home / "reports" / "check_plan.csv", dtype=str, keep_default_na=False)
    truth = pd.read_csv(home / "truth.csv", dtype=str, keep_default_na=False).set_index("image_id")["true_labels"]
    folder = home / "exports" / "cvat" / "checks-plan-001"
    status, output = _cli(["checks", "export", "--home", str(home), "--to", "cvat", "--out", str(folder)])
    assert status == 0, output
    server, url = InMemoryCvat(), "https://cvat.example.com"

    pushed = push_task(server, url, folder, plan=1)
    task = server.tasks[pushed.task_id]
    assert task["labels"] == load_settings(home).classes and task["label_types"] == {"tag"}
    assert sorted(task["names"]) == sorted(cvat.image_name(i) for i in to_check["image_id"])
    assert not any(task["tags"].values())  # nothing pre-filled: the vendor's label is not shown
    assert push_task(server, url, folder, plan=1) == pushed and len(server.tasks) == 1  # pushed once
    assert pushed_tasks(home / "exports", url) == [pushed] and pushed_tasks(home / "exports", "https://other") == []

    # the checker tags every image but the first with its true classes
    ids = [cvat.image_id_of(name, set(truth.index)) for name in task["names"]]
    for name, image_id in list(zip(task["names"], ids))[1:]:
        task["tags"][name] = truth[image_id].split("|")
    path = pull_task(server, pushed.task_id, home / "checks")
    assert path.name == f"cvat-task-{pushed.task_id}.xml"
    status, output = _cli(["run", "--home", str(home)])
    assert status == 0, output

    checks = pd.read_csv(home / "reports" / "hand_checks.csv", dtype=str, keep_default_na=False)
    mine = checks[checks["source"].str.contains(path.name, regex=False)]
    assert dict(zip(mine["image_id"], mine["true_labels"])) == {i: truth[i] for i in ids[1:]}
    quarantined = pd.read_csv(home / "quarantine" / "checks" / f"{path.stem}.csv", dtype=str, keep_default_na=False)
    assert quarantined[["key", "reason"]].values.tolist() == [[ids[0], "not answered (no tag on the image)"]]


def test_push_and_pull_through_the_sdk_fail_clearly_and_never_leak_the_token(planned_home, tmp_path):
    home = planned_home
    settings = home / "vendor-audit.yaml"
    original = settings.read_text()
    record = home / "exports" / "cvat" / "checks-plan-001" / "cvat-task.json"
    recorded = record.read_text() if record.exists() else None
    seen: list[str] = []
    try:
        status, output = _cli(["checks", "pull", "--home", str(home), "--from", "cvat"])
        assert status == 2 and "set cvat_url" in output
        with refusing_server(seen) as url:
            settings.write_text(original.replace("cvat_url: ''", f"cvat_url: {url}"))
            status, output = _cli(["checks", "push", "--home", str(home), "--to", "cvat"], {"CVAT_ACCESS_TOKEN": ""})
            assert status == 2 and "CVAT_ACCESS_TOKEN" in output
            status, output = _cli(["checks", "push", "--home", str(home), "--to", "cvat"],
                                  {"CVAT_ACCESS_TOKEN": TOKEN})
            assert status == 1 and f"CVAT at {url} answered 401 Unauthorized to create the task" in output, output
            status, output = _cli(["checks", "pull", "--home", str(home), "--from", "cvat", "--task", "7"],
                                  {"CVAT_ACCESS_TOKEN": TOKEN})
            assert status == 1 and "answered 401 Unauthorized to find task 7" in output, output
        assert TOKEN not in output
        assert f"Bearer {TOKEN}" in seen  # the adapter sent the token the way CVAT takes a personal access token
        assert (home / "exports" / "cvat" / "checks-plan-001" / "images.zip").is_file()
        assert (record.read_text() if record.exists() else None) == recorded  # no task recorded on a refusal
        with pytest.raises(CvatError, match="could not be reached"):
            CvatServer(f"http://127.0.0.1:{free_port()}", TOKEN)
    finally:
        settings.write_text(original)
    for path in home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_an_export_without_annotations_is_refused_with_the_reason(tmp_path):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("images/0.png", b"")
    with pytest.raises(CvatError, match="task 3's export holds no annotations.xml"):
        annotations_in(archive.getvalue(), "task 3's export")
