"""The same deliveries audited in two homes give the same data version and byte-identical reports."""

import json

from conftest import make_home
from pipelines.cli import main

TABLES = ("scorecard.csv", "label_issues.csv", "comparisons.csv")


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_identical_deliveries_in_two_homes_give_identical_versions_and_reports(tmp_path):
    homes = [make_home(tmp_path / name, {"a": 0.0, "b": 0.2}, per_vendor=60, seed=3) for name in ("one", "two")]
    for home in homes:
        assert main(["run", "--home", str(home)]) == 0
    one, two = homes
    # the versioned data holds content only: no modification time, path or run id
    assert _files(one / "curated") == _files(two / "curated")
    assert (one / "curated.dvc").read_bytes() == (two / "curated.dvc").read_bytes()
    provenance = [json.loads((home / "reports" / "provenance.json").read_text()) for home in homes]
    assert provenance[0]["dataset_version"] == provenance[1]["dataset_version"]
    # the MLflow run id is the one thing that tells two runs apart, by design
    assert {k: v for k, v in provenance[0].items() if k != "mlflow_run"} == \
        {k: v for k, v in provenance[1].items() if k != "mlflow_run"}
    for table in (*TABLES, "audit.npz"):
        assert (one / "reports" / table).read_bytes() == (two / "reports" / table).read_bytes(), table
