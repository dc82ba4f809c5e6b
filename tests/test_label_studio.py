"""The hand-check loop through the tools checkers use: the plan out to a real Label Studio server
(started on 127.0.0.1 by this module, stopped by its pid), answered through its API as a checker
answers, pulled back with a token that is never written; a CVAT answer file beside it; the audit
re-scored; the corrected labels out."""

import contextlib
import http.cookiejar
import io
import json
import os
import subprocess
import urllib.request
import zipfile
from types import SimpleNamespace

import pandas as pd
import pytest

from conftest import make_home
from ml.corrections import corrected_labels
from ml.cvat import image_name
from pipelines.cli import main
from pipelines.servers import free_port, running
from test_readme import block_starting, run_lines

LABEL_STUDIO = os.environ.get("LABEL_STUDIO_BIN", "")
USER, PASSWORD = "checker@example.com", "a-checker-password-1"

pytestmark = pytest.mark.skipif(not LABEL_STUDIO, reason="LABEL_STUDIO_BIN is not set: make test installs Label "
                                                         "Studio in .ls-venv and sets it")


def _run(argv: list[str], env: dict | None = None) -> tuple[int, str]:
    out = io.StringIO()
    saved = dict(os.environ)
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out):
            status = main(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return status, out.getvalue()


class Server:
    """Label Studio's own server, as a checker's browser and the API see it."""

    def __init__(self, url: str):
        self.url = url
        self.cookies = http.cookiejar.CookieJar()
        # no proxy: the server is on this machine, whatever proxies other tests left in urllib's default opener
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                                  urllib.request.HTTPCookieProcessor(self.cookies))
        self.access = ""

    def call(self, path: str, data=None, method: str | None = None, form: bool = False, raw: bool = False):
        headers = {"Referer": self.url + "/"}
        body = None
        if data is not None and form:
            body = "&".join(f"{k}={urllib.request.quote(str(v))}" for k, v in data.items()).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif data is not None:
            body, headers["Content-Type"] = json.dumps(data).encode(), "application/json"
        if self.access:
            headers["Authorization"] = f"Bearer {self.access}"
        csrf = next((c.value for c in self.cookies if c.name == "csrftoken"), None)
        if csrf:  # Django's CSRF check for the logged-in session's requests
            headers["X-CSRFToken"] = csrf
        request = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        with self.opener.open(request, timeout=60) as response:
            payload = response.read()
        return payload if raw else (json.loads(payload) if payload else None)

    def personal_access_token(self) -> str:
        """Log in as the checker and create a personal access token, as Account & Settings does."""
        self.call("/user/login/", raw=True)
        csrf = next(c.value for c in self.cookies if c.name == "csrftoken")
        self.call("/user/login/", {"email": USER, "password": PASSWORD, "csrfmiddlewaretoken": csrf}, form=True,
                  raw=True)
        token = self.call("/api/token/", {}, method="POST")["token"]
        self.access = self.call("/api/token/refresh/", {"refresh": token})["access"]
        return token


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    root = tmp_path_factory.mktemp("label-studio")
    home = make_home(root / "home", {"a": 0.0, "b": 0.15, "c": 0.3}, per_vendor=120, heads=("l2softmax",))
    assert _run(["run", "--home", str(home)])[0] == 0
    # the README's block, line by line as a user types it (a smaller plan: 120 images a vendor)
    readme = block_starting("vendor-audit plan   --home DIR")
    assert [line.split(" --home")[0].split("... ")[-1].strip() for line in readme] == [
        "vendor-audit plan", "vendor-audit checks export", "vendor-audit checks export", "vendor-audit checks pull",
        "vendor-audit run"]
    replacements = {"DIR": str(home), "--budget 100": "--budget 8"}
    run_lines(readme[:3], root, replacements)
    to_check = pd.read_csv(home / "reports" / "check_plan.csv", dtype=str, keep_default_na=False)
    truth = pd.read_csv(home / "truth.csv", dtype=str, keep_default_na=False).set_index("image_id")["true_labels"]
    ls_folder = home / "exports" / "label-studio" / "checks-plan-001"
    cvat_folder = home / "exports" / "cvat" / "checks-plan-001"

    port = free_port()
    data = root / "label-studio-data"
    env = dict(LABEL_STUDIO_BASE_DATA_DIR=str(data), LABEL_STUDIO_USERNAME=USER,
               LABEL_STUDIO_PASSWORD=PASSWORD, LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="true",
               LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=str(home / "exports"), LATEST_VERSION_CHECK="false",
               COLLECT_ANALYTICS="false", SENTRY_DSN="", FRONTEND_SENTRY_DSN="")
    url = f"http://127.0.0.1:{port}"
    command = [LABEL_STUDIO, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
               "--data-dir", str(data)]
    with running(command, url + "/health", env, root / "label-studio.log", timeout=300):  # stopped by its pid
        ls = Server(url)
        token = ls.personal_access_token()
        project = ls.call("/api/projects", {"title": "hand checks, plan 1",
                                            "label_config": (ls_folder / "labeling_config.xml").read_text()})
        ls.call("/api/storages/localfiles", {"project": project["id"], "path": str(ls_folder / "images"),
                                             "use_blob_urls": False, "title": "plan 1 images"})
        ls.call(f"/api/projects/{project['id']}/import", json.loads((ls_folder / "tasks.json").read_text()))
        tasks = ls.call(f"/api/tasks?project={project['id']}&page_size=100")
        tasks = tasks["tasks"] if isinstance(tasks, dict) else tasks
        served = {t["data"]["image_id"]: ls.call(t["data"]["image"], raw=True) for t in tasks}
        # the checker: skips the first task, answers the rest from the truth, and the second with one
        # more class than the truth (a plausible set); the last task is left for CVAT
        answered = {}
        for position, task in enumerate(tasks[:-1]):
            image_id = task["data"]["image_id"]
            if position == 0:
                ls.call(f"/api/tasks/{task['id']}/annotations", {"result": [], "was_cancelled": True})
                continue
            labels = truth[image_id].split("|")
            if position == 1:
                labels = labels + [next(c for c in "0123456789" if c not in labels)]
            ls.call(f"/api/tasks/{task['id']}/annotations",
                    {"result": [{"from_name": "true_labels", "to_name": "image", "type": "choices",
                                 "value": {"choices": labels}}]})
            answered[image_id] = "|".join(sorted(labels))
        settings = (home / "vendor-audit.yaml").read_text()
        settings = settings.replace("label_studio_url: ''", f"label_studio_url: {url}")
        settings = settings.replace("label_studio_project: null", f"label_studio_project: {project['id']}")
        (home / "vendor-audit.yaml").write_text(settings)
        pulled = run_lines(readme[3:4], root, {**replacements, "LABEL_STUDIO_API_KEY=...": f"LABEL_STUDIO_API_KEY={token}"})[0]
        no_token = _run(["checks", "pull", "--home", str(home)], env={"LABEL_STUDIO_API_KEY": ""})
    # the last planned image answered in CVAT: its export (CVAT for images 1.1) dropped into checks/
    last = tasks[-1]["data"]["image_id"]
    cvat_names = zipfile.ZipFile(cvat_folder / "images.zip").namelist()
    (home / "checks" / "cvat-plan-001.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<annotations><version>1.1</version><meta><task><name>checks-plan-001'
        '</name><owner><username>cvat-checker</username></owner></task><dumped>2026-12-05 08:00:00+00:00</dumped>'
        f'</meta><image id="0" name="{image_name(last)}" width="112" height="112"><tag label="{truth[last]}" '
        'source="manual"></tag></image></annotations>\n')
    run_output = run_lines(readme[4:], root, replacements)[0]
    card_before_labels = (home / "reports" / "scorecard.csv").read_bytes()
    labels_status, labels_output = _run(["labels", "export", "--home", str(home)])
    return SimpleNamespace(home=home, to_check=to_check, truth=truth, token=token, answered=answered, last=last,
                           served=served, ls_folder=ls_folder, cvat_folder=cvat_folder, cvat_names=cvat_names,
                           pulled=pulled, no_token=no_token, run_output=run_output, labels_status=labels_status,
                           labels_output=labels_output, card_before_labels=card_before_labels, tasks=tasks)


def test_the_plan_goes_out_as_tasks_the_tool_opens_without_the_vendors_label(loop):
    planned = loop.to_check["image_id"].tolist()
    assert sorted(t["data"]["image_id"] for t in loop.tasks) == sorted(planned)
    for task in json.loads((loop.ls_folder / "tasks.json").read_text()):
        assert set(task["data"]) == {"image", "image_id", "plan"} and "predictions" not in task
    # every image opens through the server, byte for byte the exported PNG
    for task in json.loads((loop.ls_folder / "tasks.json").read_text()):
        name = task["data"]["image"].rsplit("/", 1)[1]
        assert loop.served[task["data"]["image_id"]] == (loop.ls_folder / "images" / name).read_bytes()
        assert loop.served[task["data"]["image_id"]][:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(loop.cvat_names) == sorted(image_name(i) for i in planned)
    assert "README.txt" in {p.name for p in loop.cvat_folder.iterdir()}


def test_answers_pulled_from_label_studio_and_from_cvat_rescore_the_audit(loop):
    assert len(loop.answered) == len(loop.tasks) - 2 >= 3  # one skipped, one left for CVAT
    assert "checks/label-studio-project-" in loop.pulled and "hand checks:" in loop.run_output
    checks = pd.read_csv(loop.home / "reports" / "hand_checks.csv", dtype=str, keep_default_na=False)
    from_tools = checks[checks["source"].str.contains("label-studio-project-|cvat-plan-001", regex=True)]
    got = dict(zip(from_tools["image_id"], from_tools["true_labels"]))
    expected = {**{k: v for k, v in loop.answered.items()}, loop.last: loop.truth[loop.last]}
    assert {k: "|".join(sorted(v.split("|"))) for k, v in got.items()} == expected
    quarantined = pd.read_csv(next((loop.home / "quarantine" / "checks").glob("label-studio-project-*.csv")),
                              dtype=str, keep_default_na=False)
    assert quarantined[["key", "reason"]].values.tolist() == [[loop.tasks[0]["data"]["image_id"],
                                                              "skipped in Label Studio"]]
    pulled = json.loads(next((loop.home / "checks").glob("label-studio-project-*.json")).read_text())
    checkers = {a["completed_by"]["email"] for t in pulled for a in t["annotations"]}
    assert checkers == {"checker@example.com"}
    issues = pd.read_csv(loop.home / "reports" / "label_issues.csv", dtype=str, keep_default_na=False)
    assert set(loop.answered) | {loop.last} <= set(issues.loc[issues["checked_labels"] != "", "image_id"])


def test_the_token_is_never_written_and_a_missing_token_is_a_clear_error(loop):
    token = loop.token.encode()
    for path in loop.home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert token not in path.read_bytes(), path
    status, _ = loop.no_token
    assert status == 2


def test_the_corrected_labels_follow_label_issues_and_the_checks_and_leave_the_scorecard(loop):
    assert loop.labels_status == 0, loop.labels_output
    labels = pd.read_csv(loop.home / "corrected" / "labels.csv", dtype=str, keep_default_na=False)
    issues = pd.read_csv(loop.home / "reports" / "label_issues.csv", dtype={"image_id": str, "given_label": str,
                         "suggested_label": str, "checked_labels": str, "check_source": str}, keep_default_na=False)
    expected = corrected_labels(issues).astype(str)
    pd.testing.assert_frame_equal(labels.drop(columns="p_error"), expected.drop(columns="p_error"))
    pd.testing.assert_frame_equal(pd.read_parquet(loop.home / "corrected" / "labels.parquet").drop(columns="p_error"),
                                  corrected_labels(issues).drop(columns="p_error"))
    checked = labels.set_index("image_id").loc[list(loop.answered)]
    for image_id, row in checked.iterrows():  # every checked image's decision is its check's
        answer = loop.answered[image_id].split("|")
        assert row["basis"] == "hand check"
        assert row["decision"] == ("corrected" if row["given_label"] not in answer
                                   else "ambiguous" if len(answer) > 1 else "kept")
    assert (loop.home / "reports" / "scorecard.csv").read_bytes() == loop.card_before_labels
    assert (loop.home / "corrected.dvc").is_file()
    log = subprocess.run(["git", "log", "--format=%s"], cwd=loop.home, capture_output=True, text=True).stdout
    assert log.splitlines()[0].startswith("corrected labels ")
    flagged = labels[labels["decision"].isin(["corrected", "model_suggestion"])]
    assert flagged["vendor"].nunique() >= 2  # the 15% and 30% vendors have images to relabel
    for vendor, mine in flagged.groupby("vendor"):
        relabel = next((loop.home / "exports").glob(f"relabel-*/{vendor}"))
        tasks = json.loads((relabel / "label-studio" / "tasks.json").read_text())
        assert sorted(t["data"]["image_id"] for t in tasks) == sorted(mine["image_id"])
        given = dict(zip(mine["image_id"], mine["given_label"]))
        assert all(t["predictions"][0]["result"][0]["value"]["choices"] == [given[t["data"]["image_id"]]]
                   for t in tasks)
        assert (relabel / "cvat" / "annotations.xml").is_file()
    # a second export is the same version: nothing new is committed
    status, _ = _run(["labels", "export", "--home", str(loop.home)])
    again = subprocess.run(["git", "log", "--format=%s"], cwd=loop.home, capture_output=True, text=True).stdout
    assert status == 0 and again == log
