"""Faults caused for real: killed processes, an unreachable tracking store, a broken DVC remote, bad model files."""

import os
import signal
import subprocess
import sys
from dataclasses import replace

import pandas as pd
import pytest
import torch

from conftest import make_home
from ml.config import load_settings, write_settings
from ml.train import FoldEnsemble, SmallCNN
from pipelines.cli import main
from pipelines.store import ModelFileError, load_ensemble, save_ensemble
from pipelines.servers import free_port


def _reconciles(home, all_ingested: bool = True) -> None:
    """Every delivered row of every ingested delivery is curated or quarantined exactly once."""
    for labels in (home / "landing").glob("*/*/labels.csv"):
        vendor, batch = labels.parent.parent.name, labels.parent.name
        if not all_ingested and not (home / "curated" / vendor / batch / "rows.csv").exists():
            continue
        delivered = pd.read_csv(labels)
        curated = pd.read_csv(home / "curated" / vendor / batch / "rows.csv")
        quarantined = pd.read_csv(home / "quarantine" / vendor / f"{batch}.csv")
        assert curated["image_id"].is_unique
        assert len(curated) + len(quarantined) == len(delivered)


def _kill_when(home, marker: str, timeout: float = 300) -> None:
    """Start `vendor-audit run` and SIGKILL it as soon as its log shows ``marker``."""
    command = [sys.executable, "-m", "pipelines.cli", "run", "--home", str(home)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        for line in process.stdout:
            if marker in line:
                os.killpg(process.pid, signal.SIGKILL)
                break
        else:
            pytest.fail(f"the run ended before {marker!r}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)
    assert process.returncode == -signal.SIGKILL


def test_killed_during_ingestion_and_training_the_next_run_completes(tmp_path):
    home = make_home(tmp_path / "home", {"a": 0.0, "b": 0.2, "c": 0.1}, per_vendor=150, epochs=4)
    _kill_when(home, "ingesting delivery b.batch-001")
    _kill_when(home, "fold 1/3: held-out accuracy")
    assert not (home / "reports" / "scorecard.csv").exists()
    assert main(["run", "--home", str(home)]) == 0
    _reconciles(home)
    card = pd.read_csv(home / "reports" / "scorecard.csv")
    assert sorted(card["vendor"]) == ["a", "b", "c"] and card["n_images"].sum() == 450


def test_unreachable_tracking_store_fails_clearly_and_recovers(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    home = make_home(tmp_path / "home", {"a": 0.0, "b": 0.2}, per_vendor=100, epochs=4)
    settings = load_settings(home)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    write_settings(home, replace(settings, tracking_uri=down))
    assert main(["run", "--home", str(home)]) == 1
    assert f"MLflow tracking store {down} is unavailable" in capsys.readouterr().err
    _reconciles(home, all_ingested=False)  # what was curated before the failure stays
    write_settings(home, settings)
    assert main(["run", "--home", str(home)]) == 0
    assert len(pd.read_csv(home / "reports" / "label_issues.csv")) == 200


def test_broken_dvc_remote_fails_clearly_and_recovers(tmp_path, capsys):
    home = make_home(tmp_path / "home", {"a": 0.0, "b": 0.2}, per_vendor=100, epochs=4)
    settings = load_settings(home)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the remote folder should be")
    write_settings(home, replace(settings, dvc_remote=str(blocker / "remote")))
    assert main(["run", "--home", str(home)]) == 1
    err = capsys.readouterr().err
    assert "dvc push" in err and "failed" in err
    _reconciles(home)
    write_settings(home, settings)
    assert main(["run", "--home", str(home)]) == 0
    assert any((home / "dvc-remote").rglob("*"))


def test_model_files_that_fail_to_load_or_mismatch_the_taxonomy_are_clear_errors(tmp_path):
    classes = ("cat", "dog", "bird")
    ensemble = FoldEnsemble([SmallCNN(1, 3), SmallCNN(1, 3)])
    save_ensemble(tmp_path, "v1", "softmax", ensemble, classes)
    loaded = load_ensemble(tmp_path, "v1", "softmax", classes)
    images = torch.zeros(2, 12, 12, 1, dtype=torch.uint8)
    assert torch.allclose(loaded(images), ensemble.eval()(images))
    with pytest.raises(ModelFileError, match="differ from the taxonomy"):
        load_ensemble(tmp_path, "v1", "softmax", ("cat", "dog", "fish"))
    path = tmp_path / "v1" / "ensemble-softmax.pt"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelFileError, match="cannot load the model"):
        load_ensemble(tmp_path, "v1", "softmax", classes)
    with pytest.raises(ModelFileError, match="cannot load the model"):
        load_ensemble(tmp_path, "v2", "softmax", classes)


def test_model_file_with_pickled_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (tmp_path / "v1").mkdir()
    torch.save({"classes": ["a"], "members": [Payload()]}, tmp_path / "v1" / "ensemble-softmax.pt")
    with pytest.raises(ModelFileError):
        load_ensemble(tmp_path, "v1", "softmax", ("a",))
    assert not (tmp_path / "pwned").exists()
