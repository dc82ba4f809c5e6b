"""`vendor-audit run` with bad input beside good: the run goes on, says what happened, and exits 3."""

import subprocess
import sys

import pandas as pd
import yaml

from conftest import make_home
from ml.delivery import DeliveryOutcome, IgnoredFolder, RunSummary, vendor_notes
from pipelines.cli import main
from pipelines.home import open_instance
from pipelines.summary import format_summary


def test_bad_delivery_beside_good_ones_is_quarantined_whole_and_the_run_goes_on(tmp_path, capsys):
    home = make_home(tmp_path / "home", {"a": 0.0, "b": 0.1, "c": 0.1}, per_vendor=60)
    landing = home / "landing"
    bad_labels = landing / "b" / "batch-001" / "labels.csv"
    bad_labels.write_text(bad_labels.read_text().replace("image,label", "file,class", 1))
    for image in sorted((landing / "c" / "batch-001" / "images").iterdir())[:40]:
        image.unlink()  # 40 of c's 60 rows point at missing files: a failed quarantine_share check
    (landing / "Acme Corp" / "batch-001").mkdir(parents=True)
    (landing / "notes.txt").write_text("not a delivery")
    (landing / "a" / "batch-002").mkdir()  # no _READY yet

    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--home", str(home)],
                          capture_output=True, text=True, timeout=900)
    output = done.stdout + done.stderr
    assert done.returncode == 3, output
    assert "Traceback" not in output and "Stack Trace" not in output

    # the good deliveries are curated and scored; the bad one is quarantined whole with the reason
    card = pd.read_csv(home / "reports" / "scorecard.csv")
    assert sorted(card["vendor"]) == ["a", "c"] and card.set_index("vendor")["n_images"].to_dict() == {"a": 60, "c": 20}
    quarantined = pd.read_csv(home / "quarantine" / "b" / "batch-001.csv", keep_default_na=False)
    assert quarantined["row"].tolist() == [0]
    assert quarantined.loc[0, "reason"] == f"{bad_labels}: missing required column(s) image, label (header: file,class," \
                                           f"annotator)"
    assert not (home / "curated" / "b").exists()

    summary = done.stdout[done.stdout.index("summary:"):]
    assert "deliveries read in this run: 3 (2 ingested, 1 rejected whole)" in summary
    assert "a.batch-001: 60 rows accepted, 0 quarantined" in summary
    assert "c.batch-001: 20 rows accepted, 40 quarantined; top reasons: image file not found (40)" in summary
    assert f"b.batch-001: {bad_labels}: missing required column(s) image, label" in summary
    assert "quarantine_share c.batch-001: 66.7% of rows quarantined (limit quarantine_warn_share 5.0%)" in summary
    assert "quarantine_share b.batch-001: 100.0% of rows quarantined" in summary
    assert "Acme Corp: name may only contain letters, digits, - and _" in summary
    assert "notes.txt: a file where a vendor folder is expected" in summary
    assert "waiting for _READY: a/batch-002" in summary
    assert "rejected whole" in done.stderr and "b.batch-001" in done.stderr  # logged as it happens

    # the next run reads nothing again: the rejected delivery is settled, not retried
    runs_before = {r.dagster_run.run_id for r in open_instance(home).get_run_records()}
    assert main(["run", "--home", str(home)]) == 0
    assert "no new delivery in this run" in capsys.readouterr().out
    assert {r.dagster_run.run_id for r in open_instance(home).get_run_records()} == runs_before

    # a renamed class: refused before any work, with what changed and what to do; never "current"
    settings_file = home / "vendor-audit.yaml"
    settings = yaml.safe_load(settings_file.read_text())
    old_classes = list(settings["classes"])
    settings["classes"][3] = "three"
    settings_file.write_text(yaml.safe_dump(settings, sort_keys=False))
    assert main(["run", "--home", str(home)]) == 2
    captured = capsys.readouterr()
    assert f"renamed {old_classes[3]!r} -> 'three'" in captured.err
    assert "restore the old list" in captured.err.lower() and "new home" in captured.err
    assert "current" not in captured.out + captured.err and "Traceback" not in captured.err
    assert {r.dagster_run.run_id for r in open_instance(home).get_run_records()} == runs_before


def test_debug_shows_the_traceback_of_an_error(tmp_path, capsys):
    home = make_home(tmp_path / "home", {"a": 0.0, "b": 0.1}, per_vendor=30)
    (home / "curated").mkdir()
    (home / "curated" / "taxonomy.json").write_text('{"classes": ["x", "y"]}')
    assert main(["run", "--home", str(home)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["--debug", "run", "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "TaxonomyChanged" in err


def test_a_run_with_nothing_curated_says_why_and_stops(tmp_path, capsys):
    home = make_home(tmp_path / "home", {"a": 0.0}, per_vendor=20)
    (home / "landing" / "a").rename(home / "landing" / "Acme Corp")
    assert main(["run", "--home", str(home)]) == 2
    captured = capsys.readouterr()
    assert "Acme Corp: name may only contain letters, digits, - and _" in captured.out
    assert "nothing to audit: no delivery is curated yet" in captured.err
    assert not any(r.dagster_run.job_name != "ingest_deliveries" for r in open_instance(home).get_run_records())


def test_summary_lines_name_vendor_warnings_and_changed_deliveries(tmp_path):
    card = tmp_path / "scorecard.csv"
    pd.DataFrame({"vendor": ["a", "b"], "error_rate": [0.1, 0.2], "note": ["", "only 12 images: no claims"]}).to_csv(
        card, index=False)
    assert vendor_notes(card) == {"b": "only 12 images: no claims"}
    pd.DataFrame({"vendor": ["a"], "error_rate": [0.1]}).to_csv(tmp_path / "old.csv", index=False)
    assert vendor_notes(tmp_path / "old.csv") == {}  # a scorecard without the column: no warnings

    summary = RunSummary(
        outcomes=[DeliveryOutcome("a.b1", "ingested", 10, 10, 0, [], "", 0.0, 0.05)],
        changed=["a.b0"], ignored=[IgnoredFolder("x y", "name may only contain letters, digits, - and _")],
        waiting=["a/b2"], vendor_warnings=vendor_notes(card))
    lines = "\n".join(format_summary(summary))
    assert "vendor b: only 12 images: no claims" in lines and "a.b0" in lines and "waiting for _READY: a/b2" in lines
    assert not summary.input_problems and "exit status 3" not in lines



def test_a_delivery_rewritten_byte_for_byte_is_not_changed_and_nothing_reruns(tmp_path, capsys):
    from ml.datasets import load_digits_upscaled
    from ml.simulate import simulate_deliveries

    vendors = {"a": 0.0, "b": 0.2}
    home = make_home(tmp_path / "home", vendors, per_vendor=60, epochs=3, heads=("softmax",))
    assert main(["run", "--home", str(home)]) == 0
    runs_before = {r.dagster_run.run_id for r in open_instance(home).get_run_records()}
    # what `dvc repro` does after `make demo`: the same simulation again, every file rewritten, same bytes
    simulate_deliveries(load_digits_upscaled(), vendors, 60, home, seed=0)
    capsys.readouterr()
    assert main(["run", "--home", str(home)]) == 0
    output = capsys.readouterr()
    assert "changed" not in output.out + output.err
    assert "no new delivery in this run" in output.out
    assert {r.dagster_run.run_id for r in open_instance(home).get_run_records()} == runs_before  # nothing ran

    image = sorted((home / "landing" / "b" / "batch-001" / "images").iterdir())[0]
    image.write_bytes(sorted((home / "landing" / "a" / "batch-001" / "images").iterdir())[0].read_bytes())
    assert main(["run", "--home", str(home)]) == 0
    output = capsys.readouterr()
    assert "changed after they were read, change ignored (deliver again under a new batch name): b.batch-001" \
        in output.out
    assert "delivery b.batch-001 changed in the landing folder after it was read" in output.err
