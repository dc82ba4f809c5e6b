"""The command line itself: help and defaults, --version, a missing home, log lines printed once."""

import argparse
import logging
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import dagster as dg
import pytest

import pandas as pd

from ml.config import CONFIG_NAME, SETTING_NAMES, load_settings
from ml.contract import MODEL_ONLY_CAVEAT
from ml.delivery import RunSummary
from ml.scorecard import SCORECARD_COLUMNS
from ml.wording import count
from pipelines.audit_run import _execute
from pipelines.cli import build_parser, main
from pipelines.console import console_logging
from pipelines.home import open_instance
from pipelines.summary import format_summary, model_only_lines, print_scorecard

CLI = Path(sys.executable).with_name("vendor-audit")


def _commands(parser: argparse.ArgumentParser, words: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its words after ``vendor-audit``: a command group's own commands too
    (``GROUP NAME``)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                found[words + name] = command
                found |= _commands(command, f"{words}{name} ")
    return found


def _option_entries(help_text: str) -> dict[str, str]:
    """Each option of a --help text with its whole help (continuation lines joined)."""
    entries, current = {}, None
    for line in help_text.split("options:", 1)[1].splitlines():
        if match := re.match(r"\s{2}(-[-\w]+)", line):
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith(" " * 6):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_version_is_the_installed_package_version():
    done = subprocess.run([str(CLI), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.strip() == f"vendor-audit {version('vendor-audit')}"


def test_help_of_every_command_names_a_default_for_each_option():
    commands = _commands(build_parser())
    assert {"simulate", "demo", "run", "plan", "datasets", "checkout", "ui", "mlflow-ui"} <= set(commands)
    for name, parser in commands.items():
        entries = _option_entries(parser.format_help())
        options = {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
        assert options <= set(entries), (name, options - set(entries))
        for option in options:
            assert "default" in entries[option], f"vendor-audit {name} --help: {entries[option]!r} names no default"
    assert "(default: ./home" not in commands["run"].format_help()  # the home's default is explained, not resolved


def test_help_runs_as_a_command():
    done = subprocess.run([str(CLI), "run", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "--retrain" in done.stdout and "(default: off)" in done.stdout


def test_every_command_has_a_handler_and_says_whether_it_needs_a_home():
    commands = _commands(build_parser())
    leaves = {name: parser for name, parser in commands.items() if not _commands(parser)}
    for name, parser in leaves.items():
        assert callable(parser.get_default("handler")) and parser.get_default("needs_home") in (True, False), name
    # the commands that create a home
    assert {name for name, parser in leaves.items() if not parser.get_default("needs_home")} == \
        {"init", "simulate", "demo", "bench", "bench-checks", "bench-incremental", "bench-drift",
         "bench-scale", "bench-engines"}


@pytest.mark.parametrize("command", [name for name, parser in _commands(build_parser()).items()
                                     if parser.get_default("needs_home")])
def test_a_missing_home_is_a_usage_error_naming_the_command_that_creates_one(command, tmp_path, capsys):
    home = tmp_path / "typo"
    extra = {"plan": ["--budget", "5"], "checkout": ["--dataset-version", "1"],
             "checks export": ["--to", "cvat"], "checks push": ["--to", "cvat"]}.get(command, [])
    assert main([*command.split(), "--home", str(home), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vendor-audit: error: {home}: no such vendor-audit home")
    assert f"vendor-audit simulate --home {home}" in err and f"vendor-audit demo --home {home}" in err
    assert f"vendor-audit init --home {home} --classes" in err
    assert not home.exists()


def test_ui_refuses_a_folder_without_settings_and_creates_nothing(tmp_path, capsys):
    assert main(["ui", "--home", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a vendor-audit home (no vendor-audit.yaml)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_library_log_lines_print_once_during_a_run(tmp_path, capfd):
    """With --debug the CLI prints ml's lines itself; during a Dagster run the managed python loggers
    (dagster.yaml) carry them to the run's console logger, so its own handler must step aside."""

    @dg.op
    def probe() -> None:
        logging.getLogger("ml.probe").info("probe line from the library")

    @dg.job
    def probe_job():
        probe()

    console_logging("ml", level=logging.DEBUG)
    root = logging.getLogger()
    library_handler = logging.StreamHandler(sys.stderr)  # as a library configuring the root logger would
    root.addHandler(library_handler)
    try:
        instance = open_instance(tmp_path)
        _execute(dg.Definitions(jobs=[probe_job]), "probe_job", instance, debug=True)
    finally:
        root.removeHandler(library_handler)
    assert capfd.readouterr().err.count("probe line from the library") == 1
    logging.getLogger("ml.probe").info("outside a run")  # the CLI's handler is back after the run
    assert capfd.readouterr().err.count("outside a run") == 1


def test_init_writes_a_commented_settings_file_for_the_given_classes(tmp_path, capsys):
    home = tmp_path / "new"
    assert main(["init", "--home", str(home), "--classes", "cat, dog,bird"]) == 0
    text = (home / CONFIG_NAME).read_text()
    assert load_settings(home).classes == ("cat", "dog", "bird")
    for name in SETTING_NAMES:  # every setting is in the file, explained on its own line
        line = next(line for line in text.splitlines() if line.startswith(f"{name}:"))
        assert "  # " in line, line
    assert (home / "landing").is_dir()
    assert f"vendor-audit run --home {home}" in capsys.readouterr().out
    # a second init would overwrite the user's settings: refused, the file untouched
    assert main(["init", "--home", str(home), "--classes", "x,y"]) == 2
    assert f"{home / CONFIG_NAME} exists already" in capsys.readouterr().err
    assert (home / CONFIG_NAME).read_text() == text
    # the new home is a home: run says there is nothing to audit yet (usage error), it does not crash
    assert main(["run", "--home", str(home)]) == 2
    assert "nothing to audit" in capsys.readouterr().err


def test_init_refuses_invalid_classes_and_creates_nothing(tmp_path, capsys):
    home = tmp_path / "new"
    assert main(["init", "--home", str(home), "--classes", "cat,Cat"]) == 2
    assert "duplicate" in capsys.readouterr().err
    assert not home.exists()


def test_the_printed_scorecard_has_the_contract_columns_and_no_nan_cells(capsys):
    card = pd.DataFrame({**{c: [1] for c in SCORECARD_COLUMNS}, "status": ["rated"], "note": [float("nan")],
                         "ambiguous_rate": [0.0], "basis": ["model only"], "cleanlab_error_rate": [0.1],
                         "model_version": ["3"], "true_error_rate": [0.05]})
    print_scorecard(card)
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == [*SCORECARD_COLUMNS, "status", "basis", "true_error_rate"]
    assert row.split()[-4:] == ["rated", "model", "only", "0.05"]
    print_scorecard(card, wide=True)
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == list(card.columns) and "NaN" not in out


def test_the_run_summary_says_which_verdicts_rest_on_the_model_alone_and_the_checks_to_change_it():
    # a: model only, undecided against its contract (212 checks to decide); b: model only, no count (100);
    # c: its rate combines hand checks; d: too few images to rate
    card = pd.DataFrame({"vendor": ["a", "b", "c", "d"], "n_images": [2000, 2000, 2000, 120],
                         "status": ["rated"] * 3 + ["too few images to rate"],
                         "checks_error_rate": [None, None, 0.04, None], "checks_to_decide": [212, None, None, None]})
    lines = format_summary(RunSummary(), basis=model_only_lines(card))
    assert lines[-3:] == [
        f"  {MODEL_ONLY_CAVEAT}",
        "    a: about 212 planned checks, once answered, would make its verdict check-based: vendor-audit plan --budget 212",
        "    b: about 100 planned checks, once answered, would make its verdict check-based: vendor-audit plan --budget 100"]
    assert model_only_lines(card.assign(checks_error_rate=0.04)) == []  # every rate combines hand checks
    assert "--budget N" in _commands(build_parser())["plan"].format_help()  # the option the lines name


def test_counted_nouns():
    assert [count(1, "vendor"), count(2, "vendor"), count(3, "class"), count(1200, "image")] == \
        ["1 vendor", "2 vendors", "3 classes", "1,200 images"]
    assert [count(2, "other delivery"), count(1, "delivery"), count(2, "day")] == \
        ["2 other deliveries", "1 delivery", "2 days"]


def test_loading_the_definitions_raises_no_deprecation_warning_of_ours():
    """What `dg dev`'s code server and every command load: a deprecated call of ours would print a
    warning at every start-up that the user cannot fix."""
    done = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c", "import pipelines.definitions"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_benchmark_headings_leave_out_machine_specific_paths():
    from pipelines.commands.bench import _without_paths

    argv = ["--sizes", "10000", "--source", "/data/cifar.npz", "--output=/tmp/B.md", "--plot", "x.png",
            "--home", "/h", "--backbone", "resnet50"]
    assert _without_paths(argv) == ["--sizes", "10000", "--backbone", "resnet50"]
