"""Headless-Chromium screenshots of the Dagster asset lineage and the MLflow run comparison.

Each page is also read back as rendered DOM text, and the command fails unless it shows the names a
person should see there (the assets, the compared metrics).
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from pipelines.servers import (
    MODEL_TRAINING_VIEW, dagster_dev_command, free_port, http_json, mlflow_server_command, running, stop_group,
)

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--window-size=1600,1000"]
COMMUNITY_POPUP_KEY = "communityNux"  # localStorage key of the Dagster UI's community dialog
COMMUNITY_POPUP_TEXT = "Join the Dagster community"
LINEAGE_NAMES = ("vendor_delivery", "batch_scores", "curated_dataset", "cv_models", "label_issues", "vendor_scorecard")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise FileNotFoundError("headless Chromium not found: apt-get install chromium")


class Browser:
    """Headless Chromium driven over the DevTools protocol on 127.0.0.1 (to dismiss pop-ups before a shot)."""

    def __init__(self, profile: str):
        self.port = free_port()
        command = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                   f"--remote-debugging-port={self.port}", "--remote-debugging-address=127.0.0.1", "about:blank"]
        # its own process group: closing stops the renderer and helper processes too, before the
        # profile folder is removed
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                pages = [t for t in http_json(f"http://127.0.0.1:{self.port}/json/list") if t["type"] == "page"]
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        from websockets.sync.client import connect

        self.socket = connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
        self.next_id = 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        self.socket.close()
        stop_group(self.process)


def capture(url: str, png: Path, expected: tuple[str, ...], settle: float = 8.0, focus: str = "",
            absent: tuple[str, ...] = (), focus_at: str = "center") -> str:
    """Screenshot ``url`` into ``png`` once every expected name shows (pop-ups skipped), with the element
    whose text is ``focus`` scrolled to the middle (``focus_at`` "start": to the top) when given; return
    the page text. Fails when a text of ``absent`` (a pop-up's) is on the page."""
    with tempfile.TemporaryDirectory() as profile:
        browser = Browser(profile)
        try:
            browser.call("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1, mobile=False)
            # the Dagster UI's community pop-up stays closed once this key is set (what its dismiss
            # button stores); a home's dagster.yaml written by vendor-audit also turns it off (nux)
            browser.call("Page.addScriptToEvaluateOnNewDocument",
                         source=f"try {{ localStorage.setItem('{COMMUNITY_POPUP_KEY}', '1'); }} catch (e) {{}}")
            browser.call("Page.navigate", url=url)
            deadline = time.monotonic() + 60
            text = ""
            while time.monotonic() < deadline:
                time.sleep(1.0)
                text = browser.evaluate("document.body ? document.body.innerText : ''") or ""
                if all(name in text for name in expected):
                    break
            time.sleep(settle)  # layout animations and late pop-ups
            # pop-ups and side panels: buttons named Skip, Dismiss or Close, by their text or aria-label
            browser.evaluate("for (const b of document.querySelectorAll('button')) { const name = "
                             "(b.textContent.trim() || b.getAttribute('aria-label') || '').trim(); "
                             "if (['Skip', 'Dismiss', 'Close'].includes(name)) b.click(); }")
            if focus:
                browser.evaluate(f"[...document.querySelectorAll('td, th, span, div, h1, h2, h3')].reverse()"
                                 f".find(e => e.textContent.trim() === {json.dumps(focus)})"
                                 f"?.scrollIntoView({{block: {json.dumps(focus_at)}}})")
            time.sleep(1.0)
            shot = browser.call("Page.captureScreenshot", format="png")
            png.write_bytes(base64.b64decode(shot["data"]))
            text = browser.evaluate("document.body.innerText") or ""
        finally:
            browser.close()
    missing = [name for name in expected if name not in text]
    if missing:
        raise RuntimeError(f"{url} does not show {missing} (screenshot kept at {png})")
    covering = [name for name in absent if name in text]
    if covering:
        raise RuntimeError(f"{url} shows {covering} over the page (screenshot kept at {png})")
    return text


REPORT_TRENDS = "Over time"  # the report's section with the trend plots (ml.report)


def take_screenshots(home: Path, out: Path, logs: Path) -> list[Path]:
    """Start both servers on 127.0.0.1 for this home, capture the two pages, stop the servers; then the
    rendered report.html at its trend plots, where the report has them (a vendor's second delivery or
    the home's second audit)."""
    out.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    shots = []
    port = free_port()
    command, env = dagster_dev_command(home, port)
    with running(command, f"http://127.0.0.1:{port}/server_info", env, logs / "dagster.log", timeout=180):
        png = out / "dagster-asset-lineage.png"
        capture(f"http://127.0.0.1:{port}/asset-groups", png, LINEAGE_NAMES, absent=(COMMUNITY_POPUP_TEXT,))
        shots.append(png)
    port = free_port()
    command, env = mlflow_server_command(home, port)
    base = f"http://127.0.0.1:{port}"
    with running(command, f"{base}/health", env, logs / "mlflow.log", timeout=120):
        experiment = http_json(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name=vendor-audit")
        experiment_id = experiment["experiment"]["experiment_id"]
        runs = http_json(f"{base}/api/2.0/mlflow/runs/search",
                         {"experiment_ids": [experiment_id], "max_results": 2})["runs"]
        ids = json.dumps([r["info"]["run_id"] for r in runs])
        png = out / "mlflow-run-comparison.png"
        capture(f"{base}/#/compare-runs?runs={ids}&experiments={json.dumps([experiment_id])}&{MODEL_TRAINING_VIEW}", png,
                ("heldout_accuracy",), focus="heldout_accuracy")
        shots.append(png)
    report = home / "reports" / "report.html"
    if report.is_file() and f"<h2>{REPORT_TRENDS}</h2>" in report.read_text(encoding="utf-8"):
        png = out / "report-over-time.png"
        capture(report.resolve().as_uri(), png, (REPORT_TRENDS,), settle=1.0, focus=REPORT_TRENDS, focus_at="start")
        shots.append(png)
    return shots
