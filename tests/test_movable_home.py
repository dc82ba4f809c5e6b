"""A home can be moved or copied: its MLflow store follows it, and nothing is written outside it."""

import hashlib
import logging
import shutil
import time
from pathlib import Path

import mlflow
import mlflow.artifacts

from pipelines.cli import main
from pipelines.resources import AuditHome, MlflowTracking

MODEL = "vendor-audit-classifier"


def artifact_root(home: Path) -> Path:
    return home.resolve() / "mlflow" / "artifacts"


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file's content digest and modification time: a re-run writes byte-identical reports, so
    only the time tells that a file was written again."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def _open(home: Path):
    """The mlflow client on the home's store, opened the way every command opens it."""
    return MlflowTracking(audit_home=AuditHome(home=str(home))).start().MlflowClient()


def _local(uri: str) -> Path:
    assert uri.startswith("file://"), uri
    return Path(uri.removeprefix("file://"))


def _assert_store_inside(home: Path) -> None:
    """Every location the home's store records (experiments, runs, registered versions) lies in the
    home's artifact folder, and the runs' and versions' artifacts load from there."""
    client = _open(home)
    root = artifact_root(home)
    experiments = client.search_experiments()
    assert {e.name for e in experiments} == {"Default", "vendor-audit"}
    for experiment in experiments:
        assert _local(experiment.artifact_location).is_relative_to(root), (experiment.name, experiment.artifact_location)
    runs = client.search_runs([e.experiment_id for e in experiments])
    assert len(runs) == 2
    for run in runs:
        assert _local(run.info.artifact_uri).is_relative_to(root), run.info.artifact_uri
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert "audit-report/scorecard.csv" in {a.path for a in client.list_artifacts(champion.run_id, "audit-report")}
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 2
    for version in versions:
        location = _local(client.get_model_version_download_uri(MODEL, version.version))
        assert location.is_relative_to(root) and (location / "MLmodel").is_file(), location
        listed = mlflow.artifacts.list_artifacts(artifact_uri=f"models:/{MODEL}/{version.version}")
        assert "MLmodel" in {a.path for a in listed}


def test_copied_home_runs_inside_itself_and_leaves_the_original_alone(audited_home, tmp_path, monkeypatch):
    # the original is itself a copy (the session's home stays untouched), opened once: a moved home.
    # The session's home was audited in this process, so MLflow's per-process cache knows where its
    # runs' artifacts go (by run id, which the copies share)
    original = tmp_path / "original"
    shutil.copytree(audited_home, original, symlinks=True)
    _assert_store_inside(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy, symlinks=True)
    before = {"original": _snapshot(original), "session home": _snapshot(audited_home / "mlflow")}
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    started = time.time()

    assert main(["run", "--home", str(copy), "--rescore"]) == 0

    assert sorted(p.name for p in cwd.iterdir()) == []  # no ./mlruns, nothing else
    after = {"original": _snapshot(original), "session home": _snapshot(audited_home / "mlflow")}
    for name in before:
        changed = sorted(k for k in before[name].keys() | after[name].keys() if before[name].get(k) != after[name].get(k))
        assert not changed, f"{name} written by a run in its copy: {changed[:5]}"
    _assert_store_inside(copy)
    champion = _open(copy).get_model_version_by_alias(MODEL, "champion")
    attached = artifact_root(copy) / champion.run_id / "artifacts" / "audit-report" / "scorecard.csv"
    assert attached.stat().st_mtime >= started - 1  # the copy's report went to the copy's run
    assert attached.read_bytes() == (copy / "reports" / "scorecard.csv").read_bytes()
    _assert_store_inside(original)  # the original still loads its own artifacts


def test_default_experiment_keeps_its_artifacts_in_the_home(tmp_path, monkeypatch, caplog):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    fresh, earlier = tmp_path / "fresh", tmp_path / "earlier"
    for home in (fresh, earlier):
        home.mkdir()
        (home / "vendor-audit.yaml").write_text("classes: [cat, dog]\n")
    # a store made as earlier releases made it: by the mlflow client, whose Default experiment is
    # placed in ./mlruns/0 of the directory it was started in
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (earlier / "mlflow").mkdir()
    mlflow.set_tracking_uri(f"sqlite:///{earlier / 'mlflow' / 'mlflow.db'}")
    assert Path(mlflow.MlflowClient().get_experiment("0").artifact_location) == elsewhere / "mlruns" / "0"
    monkeypatch.chdir(cwd)

    with caplog.at_level(logging.INFO, logger="pipelines"):
        for home in (fresh, earlier):
            default = _open(home).get_experiment("0")
            assert default.artifact_location == (artifact_root(home) / "0").as_uri()
    assert "Default experiment put its artifacts in " + str(elsewhere / "mlruns" / "0") in caplog.text
    assert list(cwd.iterdir()) == []
