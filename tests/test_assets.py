"""Assets, sensor and Definitions on a real (ephemeral) Dagster instance and a real DVC repository."""

import dagster as dg
import pandas as pd

from assets.dataset import curated_dataset
from assets.ingestion import vendor_delivery
from assets.scoring import batch_scores
from pipelines.automation import delivery_sensor
from pipelines.definitions import build_definitions
from pipelines.resources import AuditHome, DvcRepo, MlflowTracking


def test_ingestion_asset_writes_curated_rows_and_passes_its_checks(small_home):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("deliveries", ["a.batch-001", "b.batch-001"])
    # one bad row in b's delivery: it must be quarantined, not lost
    labels = small_home / "landing" / "b" / "batch-001" / "labels.csv"
    labels.write_text(labels.read_text() + "images/none.png,7\n")
    home = AuditHome(home=str(small_home))
    for key in ("a.batch-001", "b.batch-001"):
        result = dg.materialize([vendor_delivery], partition_key=key, instance=instance, resources={"audit_home": home})
        assert result.success
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        assert checks["rows_reconcile"].passed
    metadata = result.asset_materializations_for_node("vendor_delivery")[0].metadata
    assert metadata["n_delivered"].value == 61 and metadata["n_quarantined"].value == 1
    assert checks["quarantine_share"].passed  # 1 of 61 is under the default 5% limit
    assert checks["quarantine_share"].metadata["share"].value == 1 / 61
    quarantine = pd.read_csv(small_home / "quarantine" / "b" / "batch-001.csv")
    assert quarantine["reason"].tolist() == ["image file not found"]
    assert len(pd.read_csv(small_home / "curated" / "a" / "batch-001" / "rows.csv")) == 60

    dataset = dg.materialize([vendor_delivery.to_source_assets()[0], curated_dataset], instance=instance,
                             resources={"audit_home": home, "dvc": DvcRepo(audit_home=home)})
    version = dataset.asset_materializations_for_node("curated_dataset")[0].metadata["dataset_version"].value
    assert version.endswith(".dir") and (small_home / "curated.dvc").read_text().count(version.removesuffix(".dir")) == 1
    assert any((small_home / "dvc-remote").rglob("*")), "the snapshot was pushed to the default remote"


def test_degenerate_images_are_quarantined_and_do_not_set_the_inferred_image_size(small_home):
    import json
    from dataclasses import replace

    import numpy as np
    from PIL import Image

    from ml.config import load_settings, write_settings

    write_settings(small_home, replace(load_settings(small_home), max_aspect_ratio=2))
    folder = small_home / "landing" / "a" / "batch-001"
    Image.fromarray(np.full((1, 1), 255, np.uint8)).save(folder / "images" / "dot.png")
    wide = np.random.default_rng(0).integers(0, 256, (24, 60), dtype=np.uint8)
    Image.fromarray(wide).save(folder / "images" / "wide.png")
    labels = (folder / "labels.csv").read_text().splitlines(keepends=True)
    # the 1x1 image comes first, where the image size is inferred from
    degenerate = "images/dot.png,7,a-team\nimages/wide.png,3,a-team\n"
    (folder / "labels.csv").write_text(labels[0] + degenerate + "".join(labels[1:]))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("deliveries", ["a.batch-001"])
    result = dg.materialize([vendor_delivery], partition_key="a.batch-001", instance=instance,
                            resources={"audit_home": AuditHome(home=str(small_home))})
    assert json.loads((small_home / "curated" / "format.json").read_text()) == {"image_size": 24, "channels": 1}
    quarantine = pd.read_csv(small_home / "quarantine" / "a" / "batch-001.csv")
    assert quarantine[["row", "reason"]].values.tolist() == [
        [1, "image too small (1x1 px; min_image_side 8 px)"],
        [2, "extreme aspect ratio (2.5:1, 60x24 px; max_aspect_ratio 2)"]]  # the setting reaches the asset
    metadata = result.asset_materializations_for_node("vendor_delivery")[0].metadata
    assert (metadata["n_delivered"].value, metadata["n_accepted"].value, metadata["n_quarantined"].value) == (62, 60, 2)
    assert {c.check_name: c.passed for c in result.get_asset_check_evaluations()}["rows_reconcile"]


def test_sensor_adds_partitions_for_complete_deliveries_once(small_home):
    instance = dg.DagsterInstance.ephemeral()
    (small_home / "landing" / "c" / "batch-001").mkdir(parents=True)  # no _READY yet: waits
    resources = {"audit_home": AuditHome(home=str(small_home))}
    result = delivery_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert sorted(r.partition_key for r in result.run_requests) == ["a.batch-001", "b.batch-001"]
    assert result.dynamic_partitions_requests[0].partition_keys == ["a.batch-001", "b.batch-001"]
    instance.add_dynamic_partitions("deliveries", ["a.batch-001", "b.batch-001"])
    again = delivery_sensor(dg.build_sensor_context(instance=instance, resources=resources))
    assert not again.run_requests and "no new complete delivery" in again.skip_reason.skip_message


def test_definitions_load_with_the_whole_lineage(tmp_path, monkeypatch):
    monkeypatch.delenv("VENDOR_AUDIT_HOME", raising=False)
    import pipelines.definitions as module  # importing reads no environment

    dg.Definitions.validate_loadable(module.defs)
    defs = build_definitions(str(tmp_path))
    graph = defs.resolve_asset_graph()
    keys = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert keys == {"vendor_delivery", "curated_dataset", "hand_checks", "cv_models", "batch_scores", "label_issues",
                    "vendor_scorecard"}
    assert graph.get(dg.AssetKey("label_issues")).parent_keys == {dg.AssetKey("cv_models"), dg.AssetKey("batch_scores"),
                                                                  dg.AssetKey("hand_checks")}
    assert graph.get(dg.AssetKey("hand_checks")).parent_keys == {dg.AssetKey("curated_dataset")}
    assert graph.get(dg.AssetKey("cv_models")).parent_keys == {dg.AssetKey("curated_dataset")}
    assert graph.get(dg.AssetKey("vendor_scorecard")).parent_keys == {dg.AssetKey("label_issues")}
    assert graph.get(dg.AssetKey("curated_dataset")).parent_keys == {dg.AssetKey("vendor_delivery")}
    assert defs.resolve_schedule_def("nightly_audit").cron_schedule == "0 2 * * *"
    assert defs.resolve_sensor_def("delivery_sensor").job_name == "ingest_deliveries"
    assert defs.resolve_sensor_def("checks_sensor").job_name == "score_vendors"
    assert {j.name for j in defs.resolve_all_job_defs()} >= {"ingest_deliveries", "score_vendors", "audit_vendors"}
    score_assets = defs.resolve_job_def("score_vendors").asset_layer.executable_asset_keys
    assert dg.AssetKey("cv_models") not in score_assets and dg.AssetKey("vendor_scorecard") in score_assets
    assert dg.AssetKey("hand_checks") in score_assets


def test_redelivery_under_an_ingested_batch_name_is_rejected_not_mixed(small_home):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("deliveries", ["a.batch-001"])
    resources = {"audit_home": AuditHome(home=str(small_home))}
    first = dg.materialize([vendor_delivery], partition_key="a.batch-001", instance=instance, resources=resources)
    rows_before = (small_home / "curated" / "a" / "batch-001" / "rows.csv").read_bytes()
    again = dg.materialize([vendor_delivery], partition_key="a.batch-001", instance=instance, resources=resources)
    assert first.success and again.success  # an unchanged re-run is a no-op
    labels = small_home / "landing" / "a" / "batch-001" / "labels.csv"
    labels.write_text(labels.read_text().replace(",0,", ",1,", 1))
    changed = dg.materialize([vendor_delivery], partition_key="a.batch-001", instance=instance, resources=resources,
                             raise_on_error=False)
    assert not changed.success
    failure = changed.get_step_failure_events()[0].event_specific_data.error.message
    assert "changed after it was ingested" in failure and "new batch name" in failure
    assert (small_home / "curated" / "a" / "batch-001" / "rows.csv").read_bytes() == rows_before


def test_delivery_with_an_unusable_labels_file_is_rejected_whole_and_the_asset_succeeds(small_home):
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("deliveries", ["a.batch-001", "b.batch-001"])
    labels = small_home / "landing" / "b" / "batch-001" / "labels.csv"
    labels.write_text(labels.read_text().replace("image,label", "file,class", 1))
    resources = {"audit_home": AuditHome(home=str(small_home))}
    for _ in range(2):  # the second run finds it settled: same outcome, nothing read again
        result = dg.materialize([vendor_delivery], partition_key="b.batch-001", instance=instance, resources=resources)
        assert result.success
        metadata = result.asset_materializations_for_node("vendor_delivery")[0].metadata
        assert metadata["rejected_whole"].value is True
        assert "missing required column(s) image, label" in metadata["reason"].value
        checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
        assert checks["rows_reconcile"].passed and checks["rows_reconcile"].metadata["accepted"].value == 0
        assert not checks["quarantine_share"].passed and checks["quarantine_share"].metadata["share"].value == 1.0
    quarantine = pd.read_csv(small_home / "quarantine" / "b" / "batch-001.csv", keep_default_na=False)
    assert quarantine["row"].tolist() == [0] and str(labels) in quarantine.loc[0, "reason"]
    assert not (small_home / "curated" / "b").exists()
    assert (small_home / ".state" / "deliveries" / "b" / "batch-001.json").is_file()
    # the good delivery beside it is ingested; the taxonomy is recorded with the first curated data
    assert dg.materialize([vendor_delivery], partition_key="a.batch-001", instance=instance, resources=resources).success
    assert len(pd.read_csv(small_home / "curated" / "a" / "batch-001" / "rows.csv")) == 60
    assert sorted(p.name for p in (small_home / "curated").iterdir()) == ["a", "format.json", "taxonomy.json"]
    # a rejected delivery fixed in place is a changed delivery: deliver it under a new batch name
    labels.write_text(labels.read_text().replace("file,class", "image,label", 1))
    changed = dg.materialize([vendor_delivery], partition_key="b.batch-001", instance=instance, resources=resources,
                             raise_on_error=False)
    failure = changed.get_step_failure_events()[0].event_specific_data.error.message
    assert "changed after it was rejected whole" in failure and "new batch name" in failure


def test_sensor_logs_ignored_landing_folders(small_home, capsys):
    (small_home / "landing" / "Acme Corp" / "batch-001").mkdir(parents=True)
    (small_home / "landing" / "README.txt").write_text("drop deliveries here")
    context = dg.build_sensor_context(instance=dg.DagsterInstance.ephemeral(),
                                      resources={"audit_home": AuditHome(home=str(small_home))})
    delivery_sensor(context)
    logged = capsys.readouterr().err
    assert "landing/Acme Corp ignored: name may only contain letters, digits, - and _" in logged
    assert "landing/README.txt ignored: a file where a vendor folder is expected" in logged


def test_rows_reconcile_blocks_downstream_assets_when_rows_are_unaccounted_for(small_home):
    """A quarantine file that lost its rows after ingestion: the re-run's count no longer reconciles
    with the delivery's record, and the blocking check stops batch_scores from running."""
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("deliveries", ["b.batch-001"])
    labels = small_home / "landing" / "b" / "batch-001" / "labels.csv"
    labels.write_text(labels.read_text() + "images/none.png,7\n")  # one row quarantined
    home = AuditHome(home=str(small_home))
    resources = {"audit_home": home, "mlflow_tracking": MlflowTracking(audit_home=home)}
    assets = [vendor_delivery, batch_scores]
    first = dg.materialize(assets, partition_key="b.batch-001", instance=instance, resources=resources)
    assert first.success and first.asset_materializations_for_node("batch_scores")
    quarantine = small_home / "quarantine" / "b" / "batch-001.csv"
    quarantine.write_text(quarantine.read_text().splitlines()[0] + "\n")  # the header only: one row lost
    again = dg.materialize(assets, partition_key="b.batch-001", instance=instance, resources=resources,
                           raise_on_error=False)
    check = {c.check_name: c for c in again.get_asset_check_evaluations()}["rows_reconcile"]
    assert not check.passed and check.metadata["quarantined"].value == 0 and check.metadata["delivered"].value == 61
    assert "1 rows unaccounted for" in check.description
    assert not again.success
    assert not again.asset_materializations_for_node("batch_scores")  # blocked: the step never ran
    assert "batch_scores" not in {e.step_key for e in again.all_events if e.event_type_value == "STEP_START"}


def test_scorecard_is_requested_declaratively_when_label_issues_updates(tmp_path):
    """vendor_scorecard is eager: nothing to do while label_issues is missing, one request once it is
    materialized (by any run, or reported), none again until it updates again."""
    defs = build_definitions(str(tmp_path))
    instance = dg.DagsterInstance.ephemeral()
    scorecard = dg.AssetKey("vendor_scorecard")
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert first.get_num_requested(scorecard) == 0  # its input is missing
    instance.report_runless_asset_event(dg.AssetMaterialization("label_issues"))
    second = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
    assert second.get_num_requested(scorecard) == 1
    assert second.total_requested == 1  # only the scorecard carries a condition
    third = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=second.cursor)
    assert third.get_num_requested(scorecard) == 0
    sensor = defs.resolve_sensor_def("scorecard_automation")
    assert sensor.default_status == dg.DefaultSensorStatus.STOPPED  # automation is off until turned on


def test_pools_are_declared_in_code_and_set_on_the_home_instance(tmp_path):
    from pipelines.home import open_instance
    from pipelines.locks import POOL_LIMITS

    defs = build_definitions(str(tmp_path))
    graph = defs.resolve_asset_graph()
    pools = {key.to_user_string(): graph.get(key).pools for key in graph.get_all_asset_keys()}
    assert pools["cv_models"] == {"training"}
    assert pools["curated_dataset"] == pools["hand_checks"] == pools["vendor_scorecard"] == {"dvc"}
    storage = open_instance(tmp_path).event_log_storage
    assert {p.name: p.limit for p in storage.get_pool_limits()} == POOL_LIMITS == {"dvc": 1, "training": 1}
