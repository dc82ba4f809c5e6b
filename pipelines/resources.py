"""Resources: where a home's files live, the MLflow tracking store, and the DVC repository."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import yaml

from ml.config import Settings, load_settings
from pipelines.locks import exclusive


class AuditHome(dg.ConfigurableResource):
    """One vendor-audit home: everything (landing, curated data, DVC, MLflow, Dagster, reports) lives under it."""

    home: str

    @property
    def root(self) -> Path:
        return Path(self.home).expanduser().resolve()

    def settings(self) -> Settings:
        return load_settings(self.root)

    @property
    def landing(self) -> Path:
        return self.root / "landing"

    @property
    def curated(self) -> Path:
        return self.root / "curated"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def delivery_state(self) -> Path:
        """Per-delivery records (change-detection fingerprint, counts, rejection), outside the
        DVC-tracked curated/ so that the dataset version depends on the data only."""
        return self.root / ".state" / "deliveries"

    @property
    def checks(self) -> Path:
        """Hand-check answer files, ``<name>.csv`` (image_id, true_labels[, checker, checked_at])."""
        return self.root / "checks"

    @property
    def gold(self) -> Path:
        """Gold (honeypot) files, ``<name>.csv`` (sha256, true_labels)."""
        return self.root / "gold"

    @property
    def plans(self) -> Path:
        """Check plans, ``plan-NNN.csv``: every image's inclusion probability in each round."""
        return self.root / "plans"

    @property
    def checks_state(self) -> Path:
        """The fingerprint of the answers last read and last scored, and the DVC versions of checks/,
        gold/ and plans/ (ml.check_plan.read_answers_state)."""
        return self.root / ".state" / "hand-checks.json"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def reports(self) -> Path:
        return self.root / "reports"


CHAMPION = "champion"


def redact(uri: str) -> str:
    """The URI without any user:password part, for messages and logs."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached or used."""


class MlflowTracking(dg.ConfigurableResource):
    """MLflow tracking store: SQLite + a local artifact folder under the home unless ``tracking_uri`` is set."""

    audit_home: AuditHome
    tracking_uri: str = ""
    experiment: str = "vendor-audit"
    registered_model: str = "vendor-audit-classifier"

    def uri(self) -> str:
        configured = self.tracking_uri or self.audit_home.settings().tracking_uri
        if configured:
            return configured
        folder = self.audit_home.root / "mlflow"
        folder.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{folder / 'mlflow.db'}"

    def start(self):
        """Point the mlflow client at this store and make sure the experiment exists; returns mlflow."""
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        uri = self.uri()
        mlflow.set_tracking_uri(uri)
        try:
            if mlflow.get_experiment_by_name(self.experiment) is None:
                local = uri.startswith("sqlite:") and not (self.tracking_uri or self.audit_home.settings().tracking_uri)
                artifacts = (self.audit_home.root / "mlflow" / "artifacts").as_uri() if local else None
                mlflow.create_experiment(self.experiment, artifact_location=artifacts)
            mlflow.set_experiment(self.experiment)
        except Exception as exc:  # noqa: BLE001 - the store is unusable, whatever the cause
            raise TrackingUnavailable(f"MLflow tracking store {redact(uri)} is unavailable: "
                                      f"{str(exc).replace(uri, redact(uri))}") from exc
        return mlflow


    def champion(self) -> dict | None:
        """The registered version with the alias ``champion``: model_version, dataset_version, head,
        run_id; None when no model has been registered yet."""
        mlflow = self.start()
        from mlflow.exceptions import MlflowException

        try:
            version = mlflow.MlflowClient().get_model_version_by_alias(self.registered_model, CHAMPION)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return {"model_version": str(version.version), "dataset_version": version.tags["dataset_version"],
                "head": version.tags["head"], "run_id": version.run_id}

    def promote(self, model_version: str) -> None:
        self.start().MlflowClient().set_registered_model_alias(self.registered_model, CHAMPION, model_version)


class DvcError(RuntimeError):
    """A DVC command failed; the message carries its output."""


# The reproducible stage: the same command line the scheduler runs. Its lock is committed after each
# audit, so `dvc status` is clean and `dvc repro` re-runs only when deliveries or settings changed.
DVC_PIPELINE = """\
stages:
  audit:
    cmd: vendor-audit run --home .
    deps:
      - landing
      - checks
      - gold
      - vendor-audit.yaml
    outs:
      - reports/scorecard.csv:
          cache: false
      - reports/label_issues.csv:
          cache: false
"""


class DvcRepo(dg.ConfigurableResource):
    """The home as a DVC repository (no git needed) with a default remote, a local folder unless set."""

    audit_home: AuditHome
    remote_url: str = ""

    def _dvc(self, *args: str) -> str:
        env = dict(os.environ, DVC_NO_ANALYTICS="1")
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=self.audit_home.root, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise DvcError(f"dvc {' '.join(args)} failed in {self.audit_home.root} (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip() or 'no output'}")
        return done.stdout

    def ensure_repo(self) -> None:
        root = self.audit_home.root
        if not (root / ".dvc").is_dir():
            self._dvc("init", "--no-scm", "-q")
            self._dvc("config", "core.autostage", "false")
        remote = self.remote_url or self.audit_home.settings().dvc_remote or str(root / "dvc-remote")
        self._dvc("remote", "add", "--default", "--force", "storage", remote)
        for folder in ("checks", "gold"):  # dependencies of the stage: they exist, empty until answers come
            (root / folder).mkdir(exist_ok=True)
        if not (root / "dvc.yaml").is_file():
            (root / "dvc.yaml").write_text(DVC_PIPELINE)

    def _exclusive(self):
        """One DVC operation at a time per repository, across processes: DVC's own lock makes a second
        command fail at once instead of waiting."""
        return exclusive(self.audit_home.root / ".locks" / "dvc.lock", "the DVC repository")

    def commit_stage(self, stage: str) -> None:
        """Record a stage's current dependencies and outputs in dvc.lock without re-running it.

        Skipped inside ``dvc repro`` (which sets DVC_STAGE): repro records the lock itself.
        """
        if os.environ.get("DVC_STAGE"):
            return
        with self._exclusive():
            self._dvc("commit", "-f", stage)

    def snapshot(self, folder: str) -> str:
        """``dvc add`` the folder (relative to the home), push it, and return its version (the DVC md5)."""
        with self._exclusive():
            self.ensure_repo()
            self._dvc("add", "-q", folder)
            self._dvc("push", "-q")
            return self.version_of(folder)

    def snapshot_folders(self, folders: list[str]) -> dict[str, str]:
        """``dvc add`` several folders (relative to the home) in one command, push, and return each one's
        version; nothing runs for an empty list."""
        if not folders:
            return {}
        with self._exclusive():
            self.ensure_repo()
            self._dvc("add", "-q", *folders)
            self._dvc("push", "-q")
            return {folder: self.version_of(folder) for folder in folders}

    def version_of(self, folder: str) -> str:
        meta = yaml.safe_load((self.audit_home.root / f"{folder}.dvc").read_text())
        return str(meta["outs"][0]["md5"])

    def status(self) -> dict:
        return json.loads(self._dvc("status", "--json") or "{}")
