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
from ml.files import atomic_write_bytes
from pipelines.locks import exclusive
from pipelines.mlflow_store import artifact_root, forget_cached_artifact_places, open_home_store, store_uri


HISTORY_FOLDER = "history"


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

    @property
    def history(self) -> Path:
        """Every audit's scorecard, ``scorecards.parquet`` (ml.history), versioned with DVC."""
        return self.root / HISTORY_FOLDER

    @property
    def features(self) -> Path:
        """The feature cache of pretrained backbones (ml.features), shared by training and scoring."""
        return self.root / "features"


CHAMPION = "champion"


def redact(uri: str) -> str:
    """The URI without any user:password part, for messages and logs."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking store cannot be reached or used."""


# the MLflow UI opens an experiment on the view its kind names; without one it guesses the GenAI view
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


class MlflowTracking(dg.ConfigurableResource):
    """MLflow tracking store: SQLite + a local artifact folder under the home unless ``tracking_uri`` is set."""

    audit_home: AuditHome
    tracking_uri: str = ""
    experiment: str = "vendor-audit"
    registered_model: str = "vendor-audit-classifier"

    def configured_uri(self) -> str:
        """The tracking URI set by this resource or the home's settings; empty for the home's own store."""
        return self.tracking_uri or self.audit_home.settings().tracking_uri

    def uri(self) -> str:
        return self.configured_uri() or store_uri(self.audit_home.root)

    def start(self):
        """Point the mlflow client at this store and make sure the experiment exists; returns mlflow.

        The home's own store is made ready first (:func:`pipelines.mlflow_store.open_home_store`):
        created with its artifacts under the home, or re-pointed when the home was moved or copied."""
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        uri = self.uri()
        local = not self.configured_uri()
        try:
            if local:
                open_home_store(self.audit_home.root)
            forget_cached_artifact_places()  # cached per run id: a copy of a home shares its run ids
            mlflow.set_tracking_uri(uri)
            experiment = mlflow.get_experiment_by_name(self.experiment)
            if experiment is None:
                artifacts = artifact_root(self.audit_home.root).as_uri() if local else None
                mlflow.create_experiment(self.experiment, artifact_location=artifacts, tags=EXPERIMENT_TAGS)
            elif any(experiment.tags.get(key) != value for key, value in EXPERIMENT_TAGS.items()):
                for key, value in EXPERIMENT_TAGS.items():  # a store made by an earlier release
                    mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
            mlflow.set_experiment(self.experiment)
        except Exception as exc:  # noqa: BLE001 - the store is unusable, whatever the cause
            raise TrackingUnavailable(f"MLflow tracking store {redact(uri)} is unavailable: "
                                      f"{str(exc).replace(uri, redact(uri))}") from exc
        return mlflow

    def champion(self) -> dict | None:
        """The registered version with the alias ``champion``: model_version, dataset_version, head,
        run_id, backbone (empty for a version registered before it was tagged); None when no model has
        been registered yet."""
        mlflow = self.start()
        from mlflow.exceptions import MlflowException

        try:
            version = mlflow.MlflowClient().get_model_version_by_alias(self.registered_model, CHAMPION)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return {"model_version": str(version.version), "dataset_version": version.tags["dataset_version"],
                "head": version.tags["head"], "run_id": version.run_id, "backbone": version.tags.get("backbone", "")}

    def promote(self, model_version: str) -> None:
        self.start().MlflowClient().set_registered_model_alias(self.registered_model, CHAMPION, model_version)


class DvcError(RuntimeError):
    """A DVC command failed; the message carries its output."""


# The reproducible pipeline of a home, two stages: `ingest` reads new deliveries and versions the data
# (curated.dvc, checks.dvc, gold.dvc, plans.dvc); `audit` scores it. DVC refuses a stage that writes
# its own dependency (its lock on curated/ is held while the command runs), so the snapshot is taken by
# `ingest` and read by `audit`: `dvc dag` shows one pipeline, curated.dvc feeding the audit. `ingest` is
# always run (it polls landing/ and the answer files, like the sensors); `audit` re-runs only when the
# data or the settings changed. Both locks are committed after each audit, so `dvc status` is clean
# (but for "ingest: always changed"). A vendor in breach of its contract does not fail `audit`
# (--no-breach-status): the breach lasts, and exit status 4 would fail every `dvc repro`; the summary,
# the report and the asset check within_contract say it.
DVC_PIPELINE = """\
stages:
  ingest:
    cmd: vendor-audit run --home . --ingest-only
    always_changed: true
    deps:
      - landing
    outs:
      - .state/deliveries:
          cache: false
          persist: true
  audit:
    cmd: vendor-audit run --home . --no-breach-status
    deps:
      - .state/deliveries
      - curated
      - checks
      - gold
      - vendor-audit.yaml
    outs:
      - reports/scorecard.csv:
          cache: false
      - reports/label_issues.csv:
          cache: false
"""
PIPELINE_STAGES = ("ingest", "audit")
# what earlier releases wrote: replaced by DVC_PIPELINE when found unchanged
_EARLIER_PIPELINES = ("""\
stages:
  ingest:
    cmd: vendor-audit run --home . --ingest-only
    always_changed: true
    deps:
      - landing
    outs:
      - .state/deliveries:
          cache: false
          persist: true
  audit:
    cmd: vendor-audit run --home .
    deps:
      - .state/deliveries
      - curated
      - checks
      - gold
      - vendor-audit.yaml
    outs:
      - reports/scorecard.csv:
          cache: false
      - reports/label_issues.csv:
          cache: false
""", """\
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
""",)

# git records the small files that say what each version is (the .dvc files, dataset.json, the
# settings, dvc.yaml and dvc.lock) and each audit's scorecard; the data is in DVC's cache and remote,
# and the rest is rebuilt (models, Dagster, MLflow) or is the vendors' input (landing/)
HOME_GITIGNORE = """\
# vendor-audit: git holds the dataset versions (*.dvc, dataset.json), the settings and each audit's
# scorecard; DVC holds the data (cache and remote); the rest is input or rebuilt
/landing/
/quarantine/
/dagster/
/mlflow/
/models/
/features/
/scores/
/.state/
/.locks/
/dvc-remote/
/logs/
/bench-cache/
/truth.csv
/reports/*
!/reports/scorecard.csv
!/reports/label_issues.csv
!/reports/provenance.json
"""
DATASET_MANIFEST = "dataset.json"  # per commit: the version, its deliveries and image counts
# the files an audit commits beside dvc.lock, when they exist
AUDIT_FILES = ("dvc.lock", "reports/scorecard.csv", "reports/label_issues.csv", "reports/provenance.json",
               "checks.dvc", "gold.dvc", "plans.dvc", f"{HISTORY_FOLDER}.dvc", ".gitignore")
GIT_IDENTITY = {"user.name": "vendor-audit", "user.email": "vendor-audit@localhost"}


def _dvc_file_version(text: str) -> str:
    """The version (DVC md5) a ``.dvc`` file's text records for its one output."""
    return str(yaml.safe_load(text)["outs"][0]["md5"])


def _without_git_location(environ) -> dict:
    """The environment without the variables that point git at a repository (set in git hooks, for
    instance), so that the home's own repository is the one used."""
    location = {"GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY", "GIT_COMMON_DIR",
                "GIT_ALTERNATE_OBJECT_DIRECTORIES", "GIT_NAMESPACE", "GIT_PREFIX"}
    return {k: v for k, v in environ.items() if k not in location}


class DvcRepo(dg.ConfigurableResource):
    """The home as a git repository with DVC: DVC versions the data (curated/, checks/, gold/, plans/)
    and pushes it to a default remote (a local folder unless set); git records each dataset version as
    a commit (``dataset <version>: + vendor/batch (N images), ...``) and each audit's scorecard.

    The home's git is its own repository, apart from any project checkout around it, with its own
    committer identity, so it works on a machine without a global git configuration.
    """

    audit_home: AuditHome
    remote_url: str = ""

    def remote(self) -> str:
        """The DVC remote every dataset version is pushed to (a folder in the home unless set)."""
        return self.remote_url or self.audit_home.settings().dvc_remote or str(self.audit_home.root / "dvc-remote")

    def version_location(self, version: str) -> str:
        """Where dataset ``version`` (a DVC md5, ``.dir`` for a folder) lies in the remote (DVC 3 layout)."""
        return f"{self.remote().rstrip('/')}/files/md5/{version[:2]}/{version[2:]}"

    def _dvc(self, *args: str) -> str:
        # DVC finds the home's git from its folder, never from a repository named by the environment
        env = dict(_without_git_location(os.environ), DVC_NO_ANALYTICS="1")
        done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=self.audit_home.root, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise DvcError(f"dvc {' '.join(args)} failed in {self.audit_home.root} (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip() or 'no output'}")
        return done.stdout

    def _git(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """git on the home's own repository only: GIT_DIR and GIT_WORK_TREE name it, so a project
        checkout around the home (``./home`` is inside one) is never read or changed."""
        root = self.audit_home.root
        env = _without_git_location(os.environ)
        env.update(GIT_DIR=str(root / ".git"), GIT_WORK_TREE=str(root), GIT_TERMINAL_PROMPT="0")
        done = subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True)
        if check and done.returncode != 0:
            raise DvcError(f"git {' '.join(args)} failed in {root} (exit {done.returncode}): "
                           f"{(done.stderr or done.stdout).strip() or 'no output'}")
        return done

    def ensure_repo(self) -> None:
        """Make the home a git repository with DVC (a home made by an earlier release, DVC without git,
        is converted in place), with its default remote, the stage file and the .gitignore."""
        root = self.audit_home.root
        if not (root / ".git").is_dir():
            self._git("init", "-q")
        for key, value in GIT_IDENTITY.items():  # local to the home: no global git config needed
            if self._git("config", "--local", "--get", key, check=False).returncode != 0:
                self._git("config", "--local", key, value)
        self._git("config", "--local", "commit.gpgsign", "false")
        config = root / ".dvc" / "config"
        if not (root / ".dvc").is_dir() or "no_scm" in (config.read_text() if config.is_file() else ""):
            if (root / ".dvc").is_dir():  # DVC without git (earlier releases): now with the home's git
                self._dvc("config", "--unset", "core.no_scm")
            else:
                self._dvc("init", "-q")
            self._dvc("config", "core.autostage", "false")  # this class stages what each commit holds
        self._dvc("remote", "add", "--default", "--force", "storage", self.remote())
        for folder in ("checks", "gold", ".state/deliveries"):  # stage dependencies: they exist, empty at first
            (root / folder).mkdir(parents=True, exist_ok=True)
        pipeline = root / "dvc.yaml"
        if not pipeline.is_file() or pipeline.read_text() in _EARLIER_PIPELINES:
            pipeline.write_text(DVC_PIPELINE)
        gitignore = root / ".gitignore"
        present = gitignore.read_text() if gitignore.is_file() else ""
        missing = [line for line in HOME_GITIGNORE.splitlines() if line and line not in present.splitlines()]
        if missing:  # DVC adds its own lines (/curated, ...): keep them
            gitignore.write_text(present + ("" if not present or present.endswith("\n") else "\n")
                                 + "\n".join(missing) + "\n")

    def _exclusive(self):
        """One DVC operation at a time per repository, across processes: DVC's own lock makes a second
        command fail at once instead of waiting."""
        return exclusive(self.audit_home.root / ".locks" / "dvc.lock", "the DVC repository")

    def _inside_own_audit_stage(self) -> bool:
        """Whether this process is the ``audit`` stage of this home's own ``dvc repro``: DVC holds a read
        lock on the stage's dependencies (curated/, checks/, gold/) while it runs, so they must not be
        written with DVC here; the ``ingest`` stage before it versioned them."""
        dvc_root = os.environ.get("DVC_ROOT")
        return (os.environ.get("DVC_STAGE") == "audit" and bool(dvc_root)
                and Path(dvc_root).resolve() == self.audit_home.root)

    def commit_stage(self, *stages: str) -> None:
        """Record the stages' current dependencies and outputs in dvc.lock without re-running them
        (default: the home's pipeline, ingest and audit).

        Skipped inside the home's own ``dvc repro`` (repro records the lock itself); under another
        repository's ``dvc repro`` (the project's) it runs.
        """
        if self._inside_own_audit_stage():
            return
        with self._exclusive():
            self._dvc("commit", "-f", *(stages or PIPELINE_STAGES))

    def snapshot(self, folder: str) -> str:
        """``dvc add`` the folder (relative to the home), push it, and return its version (the DVC md5);
        :meth:`record_dataset` commits it. Inside the home's own audit stage: the version ``ingest`` took."""
        if self._inside_own_audit_stage() and (self.audit_home.root / f"{folder}.dvc").is_file():
            return self.version_of(folder)
        with self._exclusive():
            self.ensure_repo()
            self._dvc("add", "-q", folder)
            self._dvc("push", "-q")
            return self.version_of(folder)

    def snapshot_folders(self, folders: list[str]) -> dict[str, str]:
        """``dvc add`` several folders (relative to the home) in one command, push, and return each one's
        version; nothing runs for an empty list. Inside the home's own audit stage: the versions
        ``ingest`` took."""
        if not folders:
            return {}
        if self._inside_own_audit_stage():
            return {f: self.version_of(f) for f in folders if (self.audit_home.root / f"{f}.dvc").is_file()}
        with self._exclusive():
            self.ensure_repo()
            self._dvc("add", "-q", *folders)
            self._dvc("push", "-q")
            return {folder: self.version_of(folder) for folder in folders}

    def snapshot_history(self) -> str:
        """``dvc add`` history/ (every audit's scorecard) and push it; :meth:`record_audit` commits its
        version. Also inside the home's own ``dvc repro``: history/ is neither a dependency nor an
        output of its stages, so DVC holds no lock on it there."""
        with self._exclusive():
            self.ensure_repo()
            self._dvc("add", "-q", HISTORY_FOLDER)
            self._dvc("push", "-q", f"{HISTORY_FOLDER}.dvc")
            return self.version_of(HISTORY_FOLDER)

    def answer_folders(self) -> list[str]:
        """The hand-check folders to version: one is versioned once it has a file, and keeps being
        versioned (even emptied) once it has a version."""
        root = self.audit_home.root
        return [folder for folder in ("checks", "gold", "plans")
                if ((root / folder).is_dir() and any(p.is_file() for p in (root / folder).iterdir()))
                or (root / f"{folder}.dvc").is_file()]

    def snapshot_dataset(self, rows) -> tuple[str, str | None]:
        """Version curated/ (:meth:`snapshot`) and commit the version when it is new (:meth:`record_dataset`);
        ``rows``: the curated rows (vendor, batch per image). Returns the version and the commit (None when
        recorded already)."""
        version = self.snapshot("curated")
        per_delivery = rows.groupby(["vendor", "batch"]).size()
        return version, self.record_dataset(version, {f"{v}/{b}": int(n) for (v, b), n in per_delivery.items()})

    def record_dataset(self, version: str, images_per_delivery: dict[str, int]) -> str | None:
        """Commit a dataset snapshot: its .dvc file and ``dataset.json`` (version, deliveries with their
        image counts), as ``dataset <version>: + vendor/batch (N images), ...`` (the deliveries added
        since the previous version). Returns the commit id; None when the version is recorded already
        (an unchanged dataset, or a past version restored by :meth:`checkout_dataset`)."""
        with self._exclusive():
            self.ensure_repo()
            if self.dataset_commit(version) is not None:
                return None
            previous = self.manifest("HEAD") or {}
            before = previous.get("deliveries", {})
            added = [f"{key} ({n} images)" for key, n in sorted(images_per_delivery.items()) if key not in before]
            removed = [key for key in sorted(before) if key not in images_per_delivery]
            manifest = {"dataset_version": version, "n_images": int(sum(images_per_delivery.values())),
                        "deliveries": {k: int(n) for k, n in sorted(images_per_delivery.items())}}
            atomic_write_bytes(self.audit_home.root / DATASET_MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
            changes = ", ".join([f"+ {a}" for a in added] + [f"- {r}" for r in removed]) or "same deliveries"
            return self._commit(f"dataset {version}: {changes}",
                                [DATASET_MANIFEST, "curated.dvc", ".gitignore", "dvc.yaml", ".dvc/config",
                                 ".dvc/.gitignore", ".dvcignore", "vendor-audit.yaml"])

    def record_audit(self, dataset_version: str, model: str) -> str | None:
        """Commit an audit's result (dvc.lock, the scorecard and label issues, provenance, the hand-check
        versions) as ``audit <dataset_version>: scorecard by <model>``. Nothing is committed while a
        past dataset version is checked out (its audit re-computes history, it does not add to it).
        Returns the commit id, None when nothing was committed."""
        with self._exclusive():
            if not (self.audit_home.root / ".git").is_dir() or self.checked_out_version() is not None:
                return None
            return self._commit(f"audit {dataset_version}: scorecard by {model}", list(AUDIT_FILES))

    def record_snapshot(self, folder: str, message: str) -> str | None:
        """Commit a folder's version (its ``.dvc`` file, after :meth:`snapshot`) as ``message``. Returns
        the commit id; None when that version is committed already."""
        with self._exclusive():
            return self._commit(message, [f"{folder}.dvc", ".gitignore"])

    def _commit(self, message: str, paths: list[str]) -> str | None:
        root = self.audit_home.root
        present = [p for p in paths if (root / p).exists()]
        if present:
            self._git("add", "--", *present)
        if self._git("diff", "--cached", "--quiet", check=False).returncode == 0:
            return None  # nothing changed
        self._git("commit", "-q", "--no-verify", "-m", message)  # no hooks a global config may name
        return self._git("rev-parse", "HEAD").stdout.strip()

    def manifest(self, revision: str) -> dict | None:
        """``dataset.json`` as committed at ``revision``; None where there is none."""
        done = self._git("show", f"{revision}:{DATASET_MANIFEST}", check=False)
        return json.loads(done.stdout) if done.returncode == 0 else None

    def history(self) -> list[dict]:
        """Every commit of the home, oldest first: ``commit``, ``date`` (ISO), ``subject``; ``kind``
        ``dataset`` or ``audit`` with its ``dataset_version`` (from the subject), else ``other``."""
        if not (self.audit_home.root / ".git").is_dir():
            return []
        done = self._git("log", "--reverse", "--format=%H%x1f%cI%x1f%s", check=False)
        entries = []
        for line in done.stdout.splitlines() if done.returncode == 0 else []:
            commit, date, subject = line.split("\x1f", 2)
            match = re.match(r"(dataset|audit) (\S+): ", subject)
            entries.append({"commit": commit, "date": date, "subject": subject,
                            "kind": match.group(1) if match else "other",
                            "dataset_version": match.group(2) if match else ""})
        return entries

    def dataset_commit(self, version: str) -> str | None:
        """The commit that recorded a dataset version (or the one version starting with ``version``)."""
        found = {e["dataset_version"]: e["commit"] for e in self.history() if e["kind"] == "dataset"}
        if version in found:
            return found[version]
        matches = [v for v in found if v.startswith(version)] if version else []
        if len(matches) > 1:
            raise ValueError(f"dataset version {version!r} is ambiguous: {', '.join(sorted(matches))}")
        return found[matches[0]] if matches else None

    def checked_out_version(self) -> str | None:
        """The dataset version restored by :meth:`checkout_dataset` when it is not the latest: curated.dvc
        names a recorded version other than the last commit's. None when the home is at its latest
        version, or holds a new version not committed yet (a run stopped between ``dvc add`` and the
        commit: the next snapshot commits it)."""
        root = self.audit_home.root
        if not (root / ".git").is_dir() or not (root / "curated.dvc").is_file():
            return None
        head = self._git("show", "HEAD:curated.dvc", check=False)
        if head.returncode != 0:
            return None
        current = self.version_of("curated")
        if current == _dvc_file_version(head.stdout):
            return None
        return current if self.dataset_commit(current) is not None else None

    def checkout_dataset(self, version: str) -> str:
        """Restore curated/ (and dataset.json) to a recorded dataset version: ``git restore`` of its
        commit's curated.dvc, then ``dvc checkout`` (``dvc pull`` from the remote when the cache lacks
        it). ``latest`` returns to the last commit. Returns the full version restored."""
        with self._exclusive():
            if version == "latest":
                commit = "HEAD"
            else:
                commit = self.dataset_commit(version)
                if commit is None:
                    known = ", ".join(e["dataset_version"] for e in self.history() if e["kind"] == "dataset")
                    raise ValueError(f"no dataset version {version!r} in {self.audit_home.root} "
                                     f"(recorded: {known or 'none'}; vendor-audit datasets lists them)")
            self._git("restore", f"--source={commit}", "--worktree", "--", "curated.dvc", DATASET_MANIFEST)
            try:
                self._dvc("checkout", "-q", "--relink", "curated.dvc")
            except DvcError:  # not in the local cache: fetch it from the remote
                self._dvc("pull", "-q", "curated.dvc")
            return self.version_of("curated")

    def version_of(self, folder: str) -> str:
        return _dvc_file_version((self.audit_home.root / f"{folder}.dvc").read_text())

    def status(self) -> dict:
        return json.loads(self._dvc("status", "--json") or "{}")
