"""The README's commands, run as written: every ``bash`` code block is executed by a test here (``DIR``
and the few other placeholders replaced), so the README cannot drift from the code. A new block
fails ``test_every_command_block_of_the_readme_is_run`` until a test here runs it."""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import yaml
from PIL import Image

from conftest import FAST
from ml.check_plan import answers_from_truth
from ml.config import CONFIG_NAME, SETTING_NAMES, Settings, load_settings, write_settings
from ml.datasets import load_digits_upscaled
from pipelines.commands.datasets import dataset_versions

PROJECT = Path(__file__).resolve().parent.parent
README = PROJECT / "README.md"
VENV = Path(sys.executable).parent.parent


def code_blocks(language: str) -> list[list[str]]:
    """The README's fenced code blocks of ``language`` (indented ones too), each as its command lines:
    comments and blank lines dropped."""
    blocks = re.findall(rf"^ *```{language}\n(.*?)^ *```", README.read_text(), flags=re.M | re.S)
    return [[line for line in (re.sub(r"(^|\s+)#.*$", "", raw).strip() for raw in block.splitlines()) if line]
            for block in blocks]


def block_starting(command: str) -> list[str]:
    matches = [block for block in code_blocks("bash") if block[0].startswith(command)]
    assert len(matches) == 1, f"README: {len(matches)} bash blocks start with {command!r}"
    return matches[0]


# each block by its first command; the test that runs it
BLOCKS = {
    "make demo": "test_make_demo_and_the_demo_as_a_dvc_pipeline_as_the_readme_shows",
    "vendor-audit init": "test_a_new_home_and_its_automation_as_the_readme_shows",
    "vendor-audit automation": "test_a_new_home_and_its_automation_as_the_readme_shows",
    "vendor-audit run  --home DIR": "test_the_hand_check_loop_and_the_dataset_history_as_the_readme_shows",
    "vendor-audit datasets": "test_the_hand_check_loop_and_the_dataset_history_as_the_readme_shows",
    "VENDOR_AUDIT_HOME=$PWD/home": "test_dagsters_own_command_line_on_a_home_as_the_readme_shows",
    "PATH=$PWD/.venv/bin:$PATH dvc repro": "test_make_demo_and_the_demo_as_a_dvc_pipeline_as_the_readme_shows",
    "vendor-audit plan   --home DIR": "test_label_studio.py::test_answers_pulled_from_label_studio_and_from_cvat_rescore_the_audit",
    "export DAGSTER_PG_URL": "test_postgres.py::test_an_audit_its_sensor_and_schedule_run_on_an_instance_kept_in_postgresql",
}


def run_lines(lines: list[str], cwd: Path, replacements: dict[str, str], env: dict | None = None) -> list[str]:
    """Run each README line with bash (the venv's commands first on the PATH); every one must exit 0.
    Returns their standard outputs."""
    outputs = []
    environment = {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
                   **(env or {})}
    for line in lines:
        for placeholder, value in replacements.items():
            line = line.replace(placeholder, value)
        done = subprocess.run(["bash", "-c", line], cwd=cwd, env=environment, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"README command failed: {line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    return outputs


def test_every_command_block_of_the_readme_is_run():
    firsts = [block[0] for block in code_blocks("bash")]
    unrun = [first for first in firsts if not any(first.startswith(key) for key in BLOCKS)]
    assert not unrun, f"README bash blocks no test runs (add them to BLOCKS and a test): {unrun}"
    for key, test in BLOCKS.items():
        assert any(first.startswith(key) for first in firsts), f"README has no block starting {key!r} any more"
        module, _, name = test.rpartition("::")  # a test of another file: named with its file
        assert (f"def {name}(" in (Path(__file__).with_name(module).read_text())) if module else name in globals(), test


def test_the_settings_block_is_the_default_settings_file(tmp_path):
    """The README's settings block, saved as a home's settings file, is valid and gives the defaults;
    every setting is in it."""
    block = next(b for b in re.findall(r"^```yaml\n(.*?)^```", README.read_text(), flags=re.M | re.S)
                 if b.startswith("classes:"))
    (tmp_path / CONFIG_NAME).write_text(block)
    settings = load_settings(tmp_path)
    assert settings == Settings(classes=settings.classes)
    assert set(yaml.safe_load(block)) == set(SETTING_NAMES) - {"backbone", "weights", "training"}
    photo_block = next(b for b in re.findall(r"^```yaml\n(.*?)^```", README.read_text(), flags=re.M | re.S)
                       if b.startswith("backbone:"))
    assert set(yaml.safe_load(photo_block)) == {"backbone", "weights", "training"}


def test_make_test_is_what_ci_runs():
    """``make test`` installs everything, then runs this suite: running it inside the suite would
    reinstall the venv it runs in. Its recipe is checked (``make -n``), and CI runs it as written.
    (``make demo`` runs for real in the test of the demo's DVC pipeline below.)"""
    assert "make test" in block_starting("make demo")
    done = subprocess.run(["make", "-n", "test"], cwd=PROJECT, capture_output=True, text=True)
    assert done.returncode == 0 and "pytest" in done.stdout, done.stderr
    assert (PROJECT / ".ci" / "run").read_text().strip().endswith("make test")


def _deliver_three_classes(home: Path, per_class: int = 20) -> None:
    """A delivery in the README's example classes (cat, dog, bird): real digit images of 0, 1, 2."""
    data = load_digits_upscaled()
    batch = home / "landing" / "acme" / "batch-001"
    (batch / "images").mkdir(parents=True)
    rows = []
    for label, name in enumerate(("cat", "dog", "bird")):
        for i in (data.labels == label).nonzero()[0][:per_class]:
            Image.fromarray(data.images[i].squeeze()).save(batch / "images" / f"{i}.png")
            rows.append({"image": f"images/{i}.png", "label": name})
    pd.DataFrame(rows).to_csv(batch / "labels.csv", index=False)
    (batch / "_READY").touch()


def test_a_new_home_and_its_automation_as_the_readme_shows(tmp_path):
    home = tmp_path / "home"
    init = block_starting("vendor-audit init")
    run_lines(init[:1], tmp_path, {"DIR": str(home)})
    assert load_settings(home).classes == ("cat", "dog", "bird")
    _deliver_three_classes(home)
    (home / CONFIG_NAME).write_text((home / CONFIG_NAME).read_text().replace("epochs: 8", "epochs: 2"))
    run_lines(init[1:], tmp_path, {"DIR": str(home)})
    assert list(pd.read_csv(home / "reports" / "scorecard.csv")["vendor"]) == ["acme"]

    on, status, off = block_starting("vendor-audit automation")
    run_lines([on], tmp_path, {"DIR": str(home)})
    states = run_lines([status], tmp_path, {"DIR": str(home)})[0]
    assert "Sensor: delivery_sensor [RUNNING]" in states and "Schedule: nightly_audit [RUNNING]" in states
    states = run_lines([off, status], tmp_path, {"DIR": str(home)})[1]
    assert "[RUNNING]" not in states and "Sensor: checks_sensor [STOPPED]" in states


def test_dagsters_own_command_line_on_a_home_as_the_readme_shows(tmp_path):
    """The block names ``$PWD/home``, ``.venv`` and ``workspace.yaml`` of the project's root: run from a
    folder that has them (links to the project's and a new home's)."""
    from pipelines.cli import main

    home = tmp_path / "home"
    assert main(["init", "--home", str(home), "--classes", "a,b"]) == 0
    (tmp_path / ".venv").symlink_to(VENV)
    (tmp_path / "workspace.yaml").symlink_to(PROJECT / "workspace.yaml")
    sensors, schedules = run_lines(block_starting("VENDOR_AUDIT_HOME=$PWD/home"), tmp_path, {})
    assert "Sensor: delivery_sensor [STOPPED]" in sensors and "Schedule: nightly_audit [STOPPED]" in schedules


def _copy_audited_home(audited_home: Path, target: Path) -> Path:
    shutil.copytree(audited_home, target, symlinks=True)
    return target


def test_the_hand_check_loop_and_the_dataset_history_as_the_readme_shows(audited_home, tmp_path):
    home = _copy_audited_home(audited_home, tmp_path / "home")
    loop = block_starting("vendor-audit run  --home DIR")
    assert [line.split()[1] for line in loop] == ["run", "plan", "run", "plan"]
    run_lines(loop[:2], tmp_path, {"DIR": str(home)})
    # the person of the README answers the plan in checks/round1.csv
    planned = pd.read_csv(home / "reports" / "check_plan.csv", dtype=str, keep_default_na=False)
    truth = pd.read_csv(home / "truth.csv", dtype=str, keep_default_na=False)
    truth["true_labels"] = truth.get("true_labels", truth["true_label"])
    (home / "checks").mkdir(exist_ok=True)
    answers_from_truth(planned, truth, checker="ann").to_csv(home / "checks" / "round1.csv", index=False)
    run_lines(loop[2:], tmp_path, {"DIR": str(home)})
    assert (pd.read_csv(home / "reports" / "scorecard.csv")["n_checked"] > 0).all()

    history = block_starting("vendor-audit datasets")
    versions = dataset_versions(home)
    audit_commit = versions[-1]["scorecards"][-1]["commit"]
    outputs = run_lines(history, tmp_path, {"DIR": str(home), "<commit>": audit_commit,
                                            "3714f20a": versions[0]["dataset_version"][:8]})
    assert versions[0]["dataset_version"] in outputs[0]
    assert outputs[2].startswith("vendor,n_images")


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True).stdout


def test_make_demo_and_the_demo_as_a_dvc_pipeline_as_the_readme_shows(tmp_path):
    """The project's Makefile, dvc.yaml and params.yaml in a fresh checkout (git, with its .venv), on a
    small digits home with quick settings: ``make demo`` runs the pipeline (``-o install``: the venv
    is installed already), the README's ``dvc repro`` then has nothing to do, and its experiment runs
    in a home of its own."""
    project = tmp_path / "project"
    for name in ("Makefile", "dvc.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore", ".gitignore"):
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT / name, project / name)
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["demo"].update(dataset="digits", vendors="a=0.0,b=0.2", per_vendor=60)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    (project / ".venv").symlink_to(VENV)
    home = project / params["demo"]["home"]
    # quick settings: simulate keeps a settings file it finds
    quick = replace(Settings(classes=load_digits_upscaled().classes), **{**FAST, "epochs": 3, "heads": ("softmax",)})
    write_settings(home, quick)
    write_settings(project / "home-500", quick)  # the experiment's home
    identity = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    _git(project, "init", "-q")
    assert "home" not in _git(project, "status", "--porcelain", "--ignored=no")  # the homes are not the project's

    make_demo = block_starting("make demo")[0]
    run_lines([f"{make_demo} -o install"], project, {})
    assert list(pd.read_csv(home / "reports" / "scorecard.csv")["vendor"]) == ["a", "b"]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"simulate", "audit"}
    assert lock["stages"]["audit"]["params"]["home/vendor-audit.yaml"]["epochs"] == 3
    dvc = str(VENV / "bin" / "dvc")
    assert "up to date" in subprocess.run([dvc, "status"], cwd=project, capture_output=True, text=True).stdout
    assert '"simulate" -> "audit"' in subprocess.run([dvc, "dag", "--dot"], cwd=project, capture_output=True,
                                                     text=True).stdout
    # the home it made is a repository with its first dataset version and audit
    audits = _git(home, "log", "--format=%s")
    assert [s.split(":")[0].split()[0] for s in audits.splitlines()] == ["audit", "dataset"]

    repro, experiment = block_starting("PATH=$PWD/.venv/bin:$PATH dvc repro")
    again, = run_lines([repro], project, {})
    assert "Running stage" not in again, again  # neither simulates again nor retrains
    assert _git(home, "log", "--format=%s") == audits
    _git(project, "add", "-A")
    subprocess.run(["git", "commit", "-qm", "the demo"], cwd=project, env={**os.environ, **identity}, check=True)
    run_lines([experiment], project, {}, env=identity)
    assert pd.read_csv(project / "home-500" / "reports" / "scorecard.csv")["n_images"].tolist() == [500, 500]
    assert pd.read_csv(home / "reports" / "scorecard.csv")["n_images"].tolist() == [60, 60]  # the demo's, untouched
