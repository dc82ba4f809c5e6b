"""Dataset history: the home is a git repository with DVC; versions are listed, restored and re-audited.
(The project's top-level dvc.yaml, which `make demo` runs, is tested with the README's commands in
test_readme.py.)"""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from conftest import make_home
from ml.datasets import load_digits_upscaled
from ml.simulate import simulate_deliveries
from pipelines.cli import main
from pipelines.commands.datasets import dataset_versions

BIN = Path(sys.executable).parent
QUICK = dict(epochs=3, heads=("softmax",))  # enough to score; these tests are about versions, not accuracy


def _no_global_git_config(monkeypatch, tmp_path: Path) -> None:
    """As on a fresh CI machine: no global or system git configuration, so no committer identity."""
    empty = tmp_path / "gitconfig-empty"
    empty.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for name in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL", "EMAIL"):
        monkeypatch.delenv(name, raising=False)


def _git(home: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(home), *args], capture_output=True, text=True, check=True).stdout


def _dvc(cwd: Path, *args: str) -> str:
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_two_dataset_versions_are_listed_and_the_first_is_restored_with_its_scorecard(tmp_path, monkeypatch, capsys):
    _no_global_git_config(monkeypatch, tmp_path)
    home = make_home(tmp_path / "home", {"a": 0.0, "b": 0.2}, per_vendor=60, **QUICK)
    assert main(["run", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert [line.split()[:2] for line in out.splitlines()].count(["vendor", "n_images"]) == 1  # printed once
    assert out.rstrip().splitlines()[-2:] == [f"report: {home / 'reports' / 'report.md'}",
                                             f"        {home / 'reports' / 'report.html'}"]
    first_scorecard = (home / "reports" / "scorecard.csv").read_text()

    simulate_deliveries(load_digits_upscaled(), {"c": 0.1}, 60, home, seed=9, batch="batch-002")
    assert main(["run", "--home", str(home)]) == 0

    # the home's own repository, with its own identity: the project checkout around it is not used
    assert Path(_git(home, "rev-parse", "--show-toplevel").strip()) == home
    assert _git(home, "config", "--local", "user.name").strip() == "vendor-audit"
    versions = dataset_versions(home)
    assert len(versions) == 2
    first, second = versions
    assert first["deliveries"] == {"a/batch-001": 60, "b/batch-001": 60} and first["n_images"] == 120
    assert second["added"] == ["c/batch-002"] and second["n_images"] == 180
    assert [m["head"] for m in first["models"]] == ["softmax"] and first["models"][0]["champion"]
    assert second["models"] == []  # scored by the champion, not retrained
    assert len(first["scorecards"]) == len(second["scorecards"]) == 1
    subjects = _git(home, "log", "--format=%s", "--", "curated.dvc").splitlines()
    assert subjects == [f"dataset {second['dataset_version']}: + c/batch-002 (60 images)",
                        f"dataset {first['dataset_version']}: + a/batch-001 (60 images), + b/batch-001 (60 images)"]
    assert _git(home, "show", f"{first['scorecards'][0]['commit']}:reports/scorecard.csv") == first_scorecard
    assert _git(home, "status", "--porcelain") == ""
    assert "in sync" in _dvc(home, "status", "--cloud", "--all-commits")  # every version is in the remote
    assert '"curated.dvc" -> "audit"' in _dvc(home, "dag", "--dot")  # one pipeline: the snapshot feeds the audit

    capsys.readouterr()
    assert main(["datasets", "--home", str(home)]) == 0
    listing = capsys.readouterr().out
    assert first["dataset_version"] in listing and "c/batch-002 (60) new" in listing and "v1 softmax (champion)" in listing

    # restore the first version (a prefix is enough) and audit it again: its scorecard, as first written
    assert main(["checkout", "--home", str(home), "--dataset-version", first["dataset_version"][:10]]) == 0
    assert sorted(p.name for p in (home / "curated").iterdir() if p.is_dir()) == ["a", "b"]
    assert main(["run", "--home", str(home)]) == 0
    assert (home / "reports" / "scorecard.csv").read_text() == first_scorecard
    assert len(dataset_versions(home)) == 2  # re-auditing the past adds nothing to the history

    # back to the latest: the latest scorecard again, and nothing left to commit
    assert main(["checkout", "--home", str(home), "--dataset-version", "latest"]) == 0
    assert main(["run", "--home", str(home)]) == 0
    assert _git(home, "status", "--porcelain") == ""
    assert _dvc(home, "status").split() == ["ingest:", "always", "changed"]  # nothing else: data and locks current

    # the home's own pipeline: `ingest` versions a new delivery, `audit` scores it
    simulate_deliveries(load_digits_upscaled(), {"d": 0.1}, 60, home, seed=10, batch="batch-003")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    done = subprocess.run([str(BIN / "dvc"), "repro"], cwd=home, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert dataset_versions(home)[-1]["added"] == ["d/batch-003"]
    assert "d" in set(pd.read_csv(home / "reports" / "scorecard.csv")["vendor"])
