"""The home's Dagster instance on a real PostgreSQL server (dagster-postgres): the audit, the sensor
and the schedule keep their runs, events and states there, not in SQLite files."""

import dagster as dg
import psycopg2

from conftest import make_home
from ml.datasets import load_digits_upscaled
from ml.simulate import simulate_deliveries
from pipelines.automation import delivery_sensor
from pipelines.cli import main
from pipelines.home import open_instance
from pipelines.resources import AuditHome
from postgres_server import postgres_server
from test_readme import block_starting, run_lines

README_URL = "postgresql+psycopg2://user:password@db.internal:5432/vendor_audit"


def _count(url: str, sql: str) -> int:
    with psycopg2.connect(url.replace("+psycopg2", "")) as connection, connection.cursor() as cursor:
        cursor.execute(sql)
        return int(cursor.fetchone()[0])


def test_an_audit_its_sensor_and_schedule_run_on_an_instance_kept_in_postgresql(tmp_path, monkeypatch, capsys):
    with postgres_server() as (url, pid):
        home = tmp_path / "home"
        classes = ",".join(load_digits_upscaled().classes)
        init = ["init", "--home", str(home), "--classes", classes, "--dagster-postgres-env", "VA_DAGSTER_PG"]
        assert main(init) == 2  # the variable is not set yet: a clear error, nothing written
        assert "the environment variable VA_DAGSTER_PG is not set" in capsys.readouterr().err
        assert not home.exists()
        monkeypatch.setenv("VA_DAGSTER_PG", url.replace("+psycopg2", ""))  # the driver left out: said so
        assert main(init) == 2 and "through psycopg2" in capsys.readouterr().err
        assert not home.exists()

        # the README's lines, as written: the URL exported, then init
        readme = block_starting("export DAGSTER_PG_URL")
        run_lines([" && ".join(readme)], tmp_path, {"DIR": str(home), "cat,dog": classes,
                                                    README_URL: url})
        config = (home / "dagster" / "dagster.yaml").read_text()
        assert "postgres_url:\n      env: DAGSTER_PG_URL" in config and url not in config  # no URL in the home
        monkeypatch.setenv("DAGSTER_PG_URL", url)
        make_home(home, {"a": 0.0, "b": 0.2}, per_vendor=120, epochs=3, heads=("softmax",))  # storage, not accuracy

        assert main(["run", "--home", str(home)]) == 0
        instance = open_instance(home)
        assert {type(s).__name__ for s in (instance.run_storage, instance.event_log_storage,
                                            instance.schedule_storage)} == \
            {"PostgresRunStorage", "PostgresEventLogStorage", "PostgresScheduleStorage"}
        records = instance.get_run_records()
        assert records and all(r.dagster_run.status == dg.DagsterRunStatus.SUCCESS for r in records)
        assert _count(url, "select count(*) from runs") == len(records)
        assert _count(url, "select count(*) from event_logs where asset_key like '%vendor_scorecard%' "
                           "and dagster_event_type = 'ASSET_MATERIALIZATION'") == 1
        assert not [p for p in (home / "dagster").rglob("*.db")]  # no SQLite storage beside it
        # the run queue: two runs at most, the rest wait (the daemon's QueuedRunCoordinator)
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == 2

        # a new delivery: the sensor asks for its ingestion, reading the partitions from PostgreSQL
        simulate_deliveries(load_digits_upscaled(), {"c": 0.1}, 60, home, seed=3, batch="batch-002")
        context = dg.build_sensor_context(instance=instance, resources={"audit_home": AuditHome(home=str(home))})
        assert [r.partition_key for r in delivery_sensor(context).run_requests] == ["c.batch-002"]
        assert main(["run", "--home", str(home)]) == 0
        assert "c.batch-002" in open_instance(home).get_dynamic_partitions("deliveries")

        # automation on: the sensors' and the schedule's states are kept in PostgreSQL too
        assert main(["automation", "--home", str(home), "on", "delivery_sensor", "nightly_audit"]) == 0
        running = {s.instigator_name for s in open_instance(home).all_instigator_state()
                   if s.status.value == "RUNNING"}
        assert running == {"delivery_sensor", "nightly_audit"}
        assert _count(url, "select count(*) from instigators where status = 'RUNNING'") == 2
