"""engine: ray on a real local Ray cluster: the features of the local engine, cached alike; a worker
killed mid-way is replaced and its blocks recomputed, one killed mid-fold retried; a pipeline that fails caches
nothing; a delivery decoded on Ray gives the local rows, images and quarantine, and one Ray cannot decode fails
naming it, with nothing written."""

import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ml.backbones import load_backbone
from ml.engine import Engine
from ml.features import backbone_key, extract_features
from ml.image_stack import ImageStack
from ml.ray_features import ActorPlan, RayFeaturesError, compute_features_on_ray, plan_actors, ray_session


@pytest.fixture(scope="module")
def ray_cluster():
    with ray_session(num_cpus=2) as ray:  # one local cluster for the module, stopped after it
        yield ray


def _delivered_images(folder: Path, sizes=(40, 56), side: int = 32, seed: int = 0) -> ImageStack:
    """Photos as the curated deliveries hold them: uint8 .npy files, memory-mapped."""
    rng = np.random.default_rng(seed)
    files = []
    for i, n in enumerate(sizes):
        files.append(folder / f"delivery-{i}.npy")
        np.save(files[-1], rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8))
    return ImageStack.open(files)


def test_an_empty_address_starts_a_local_ray_even_where_ray_address_names_another():
    """In a process of its own (this module's cluster is already up): RAY_ADDRESS points nowhere, and
    the empty setting still means a local Ray started for the call."""
    import subprocess
    import sys

    code = ("from ml.ray_features import ray_session\n"
            "with ray_session(num_cpus=1) as ray:\n"
            "    print('CPUs', ray.cluster_resources()['CPU'])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "CPUs 1.0" in done.stdout


def test_actors_follow_the_clusters_gpus_else_its_cpus():
    assert plan_actors({"CPU": 2.0, "memory": 1e9}) == ActorPlan(2, 0.0, 1.0, 64)
    assert plan_actors({"CPU": 64.0, "GPU": 4.0}) == ActorPlan(4, 1.0, 0.0, 256)  # one per GPU, large batches
    assert plan_actors({}) == ActorPlan(1, 0.0, 1.0, 64)


def test_the_ray_engine_gives_the_local_features_and_fills_the_cache_alike(tmp_path, ray_cluster):
    images = _delivered_images(tmp_path)
    backbone = load_backbone("mobilenet_v3_small", "none", image_side=32)  # random weights: shipped, not reloaded
    local, local_stats = extract_features(backbone, images, tmp_path / "cache-local")
    on_ray, ray_stats = extract_features(backbone, images, tmp_path / "cache-ray", engine=Engine("ray"))
    assert local_stats.n_computed == ray_stats.n_computed == len(images)
    assert ray_stats.device.startswith("ray")
    # the actors run one torch thread each, the driver two: the sums differ in their last bits only
    np.testing.assert_allclose(on_ray, local, rtol=1e-4, atol=1e-5)
    chunks = list((tmp_path / "cache-ray" / backbone_key(backbone)).glob("*.npz"))
    assert len(chunks) == 1
    again, stats = extract_features(backbone, images, tmp_path / "cache-ray", engine=Engine("ray"))
    assert stats.n_computed == 0 and stats.n_cached == len(images)
    np.testing.assert_array_equal(again, on_ray)


def test_an_in_memory_array_goes_through_the_object_store(ray_cluster):
    images = np.random.default_rng(1).integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    backbone = load_backbone("mobilenet_v3_small", "none", image_side=32)
    rows = np.array([29, 3, 17, 0])  # any order: results are placed by row
    local = extract_features(backbone, images[rows], None)[0]
    on_ray = compute_features_on_ray(backbone, images, rows, ActorPlan(2, 0.0, 1.0, 2))
    np.testing.assert_allclose(on_ray, local, rtol=1e-4, atol=1e-5)


def test_a_probe_ensemble_scores_later_images_with_features_from_ray(tmp_path, ray_cluster):
    from ml.train import FeatureHead, ProbeEnsemble

    images = _delivered_images(tmp_path, sizes=(24,))
    backbone = load_backbone("mobilenet_v3_small", "none", image_side=32)
    heads = [FeatureHead(backbone.feature_dim, 3, "softmax", 16.0).eval()]
    local = ProbeEnsemble(backbone, heads).features(images)
    on_ray = ProbeEnsemble(backbone, heads, engine=Engine("ray")).features(images)
    np.testing.assert_allclose(on_ray, local, rtol=1e-4, atol=1e-5)


def _separable_features(n: int = 300, dim: int = 16, classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(0, 2, (classes, dim))
    return (centres[labels] + rng.normal(0, 1, (n, dim))).astype(np.float32), labels


def test_probe_fold_heads_trained_as_ray_tasks_are_the_local_heads(ray_cluster):
    from ml.train import TrainConfig, cross_validate_probe

    features, labels = _separable_features()
    config = TrainConfig(folds=3, training="probe", probe_epochs=12)
    local_epochs, ray_epochs = [], []
    local = cross_validate_probe(features, labels, 3, config, local_epochs.append)
    on_ray = cross_validate_probe(features, labels, 3, replace(config, engine="ray"), ray_epochs.append)
    # one torch thread per head on both engines: the same heads to the last bit
    np.testing.assert_array_equal(on_ray.probs, local.probs)
    np.testing.assert_array_equal(on_ray.embeddings, local.embeddings)
    np.testing.assert_array_equal(on_ray.fold, local.fold)
    assert ray_epochs == local_epochs and {e["fold"] for e in ray_epochs} == {1, 2, 3}  # the losses MLflow logs
    assert local.accuracy(labels) > 0.9


def test_a_fold_that_fails_on_ray_names_the_fold_and_its_cause(ray_cluster):
    from ml.ray_training import RayTrainingError
    from ml.train import TrainConfig, cross_validate_probe

    features, labels = _separable_features(n=60)
    config = TrainConfig(folds=2, training="probe", head="cosine", engine="ray")
    with pytest.raises(RayTrainingError, match=r"fold 1/2 head training on Ray failed: .*unknown head 'cosine'"):
        cross_validate_probe(features, labels, 3, config)


def _busy_ray_workers(task: str) -> list:
    """The Ray worker processes now running ``task`` (Ray titles a busy worker after its task)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::") and task in cmdline[0]:
            found.append(process)
    return found


def test_a_worker_killed_mid_fold_is_retried_and_gives_the_local_heads(ray_cluster):
    from ml.train import TrainConfig, cross_validate_probe

    features, labels = _separable_features(n=12_000, dim=128, classes=5)
    # every epoch run (no early stop), so that a fold lasts long enough to be killed in the middle
    config = TrainConfig(folds=2, training="probe", probe_epochs=30, probe_patience=30)
    local_epochs, ray_epochs, result, failure = [], [], {}, {}
    local = cross_validate_probe(features, labels, 5, config, local_epochs.append)

    def train():
        try:
            result["fit"] = cross_validate_probe(features, labels, 5, replace(config, engine="ray"), ray_epochs.append)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            failure["error"] = exc

    worker = threading.Thread(target=train)
    worker.start()
    deadline = time.monotonic() + 120
    while not (busy := _busy_ray_workers("_fit_fold")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert busy, "no fold task started within two minutes"
    time.sleep(0.5)  # mid-way through the fold's epochs
    assert worker.is_alive(), "the training ended before its worker could be killed"
    victim = busy[0]
    victim.send_signal(signal.SIGKILL)  # a real kill of the real worker process
    victim.wait(timeout=30)
    worker.join(timeout=300)
    assert not worker.is_alive()
    assert not failure, failure
    # the fold ran again from the start: the same heads, and the losses of one full run per fold
    np.testing.assert_array_equal(result["fit"].probs, local.probs)
    assert ray_epochs == local_epochs


def test_a_worker_killed_mid_extraction_is_replaced_and_its_blocks_recomputed(tmp_path, ray_cluster):
    images = _delivered_images(tmp_path, sizes=(400, 400), side=48, seed=2)
    backbone = load_backbone("mobilenet_v3_small", "none", image_side=48)
    rows = np.arange(len(images))
    expected = extract_features(backbone, images, None)[0]
    pids = tmp_path / "actors"
    pids.mkdir()
    result, failure = {}, {}

    def extract():
        try:
            result["features"] = compute_features_on_ray(backbone, images, rows, ActorPlan(2, 0.0, 1.0, 16),
                                                         pid_folder=pids)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            failure["error"] = exc

    worker = threading.Thread(target=extract)
    worker.start()
    deadline = time.monotonic() + 120
    while not any(pids.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    victims = sorted(pids.iterdir())
    assert victims, "no Ray actor started within two minutes"
    time.sleep(1.0)  # mid-way: the actor has started on its blocks
    assert worker.is_alive(), "the extraction ended before the worker could be killed"
    os.kill(int(victims[0].name), signal.SIGKILL)  # a real kill of the real worker process
    worker.join(timeout=300)
    assert not worker.is_alive()
    assert not failure, failure
    assert len(list(pids.iterdir())) > len(victims), "no replacement actor was started"
    np.testing.assert_allclose(result["features"], expected, rtol=1e-4, atol=1e-5)


def test_a_failed_extraction_on_ray_raises_and_caches_nothing(tmp_path, ray_cluster):
    images = _delivered_images(tmp_path)
    backbone = load_backbone("mobilenet_v3_small", "none", image_side=32)
    for file in tmp_path.glob("delivery-*.npy"):
        file.unlink()  # the workers cannot read the deliveries (a cluster without the home's folder)
    with pytest.raises(RayFeaturesError, match=f"0 of {len(images)} images done: FileNotFoundError"):
        extract_features(backbone, images, tmp_path / "cache", engine=Engine("ray"))
    assert not list((tmp_path / "cache").rglob("*.npz"))


def test_a_home_audited_with_either_engine_gives_the_same_scorecard(tmp_path):
    """The whole run (ingest, DVC, probe training logged to MLflow, audit) with engine local and ray:
    the features differ in their last bits at most, and the scorecard not at all."""
    import mlflow
    import pandas as pd

    from conftest import make_home
    from pipelines.cli import main

    cards = {}
    for engine in ("local", "ray"):
        home = make_home(tmp_path / engine, {"a": 0.0, "b": 0.2}, per_vendor=60, backbone="efficientnet_lite0",
                         weights="auto", training="probe", engine=engine)
        assert main(["run", "--home", str(home)]) == 0
        cards[engine] = pd.read_csv(home / "reports" / "scorecard.csv")
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        engines = {run.data.tags["feature_engine"] for run in runs if "feature_engine" in run.data.tags}
        assert engines == {"cpu" if engine == "local" else "ray (local)"}
    assert list(cards["ray"]["vendor"]) == ["a", "b"]
    pd.testing.assert_frame_equal(cards["ray"], cards["local"])


def test_a_run_on_engine_ray_starts_one_local_ray_for_all_its_jobs(tmp_path):
    """In a process of its own (no Ray up): a run ingests two deliveries, trains and scores, each job
    on Ray, and starts one local Ray for all of them, stopped at the end (each started its own before)."""
    import subprocess
    import sys

    from conftest import make_home

    home = make_home(tmp_path / "home", {"a": 0.0, "b": 0.2}, per_vendor=30, backbone="efficientnet_lite0",
                     weights="auto", training="probe", engine="ray")
    assert len(list((home / "landing").glob("*/*/_READY"))) == 2
    code = ("import ray\n"
            "from pipelines.audit_run import audit\n"
            "started, real_init = [], ray.init\n"  # a spy: Ray itself starts as ever
            "ray.init = lambda *args, **kwargs: started.append(kwargs.get('address')) or real_init(*args, **kwargs)\n"
            f"done = audit(__import__('pathlib').Path({str(home)!r}))\n"
            "print('started', started, 'up after', ray.is_initialized(), 'vendors', list(done.scorecard['vendor']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "started ['local'] up after False vendors ['a', 'b']" in done.stdout


def _png_delivery(folder: Path, n_photos: int = 600):
    """A ready delivery of real PNG files written with PIL: ``n_photos`` noise photos of a few sizes
    (several decoding batches), then the bad rows every check must catch, some after a batch boundary."""
    import io

    import pandas as pd
    from PIL import Image

    from ml.delivery import Delivery

    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    rows = []
    for i in range(n_photos):
        height, width = (32, 32) if i % 3 else (40 + i % 7, 48)  # some are scaled and cut to 32 px
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"p{i:04d}.png")
        rows.append((f"p{i:04d}.png", ("cat", "dog")[i % 2]))
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    (folder / "corrupt.png").write_bytes(buffer.getvalue()[:60])  # a header, then nothing to decode
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(folder / "blank.png")
    Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).save(folder / "tiny.png")
    (folder / "copy.png").write_bytes((folder / "p0001.png").read_bytes())
    rows += [("corrupt.png", "cat"), ("blank.png", "dog"), ("tiny.png", "cat"),
             ("p0002.png", "cat"),    # a duplicate row
             ("copy.png", "cat"),     # the content of row 2 again, under another name and label
             ("p0003.png", "horse"),  # an unknown label
             ("gone.png", "dog")]     # no such file
    pd.DataFrame(rows, columns=["image", "label"]).to_csv(folder / "labels.csv", index=False)
    (folder / "_READY").write_text("")
    return Delivery("v", "b", folder)


def test_a_delivery_decoded_on_ray_gives_the_local_rows_images_and_quarantine(tmp_path, ray_cluster):
    import pandas as pd

    from ml.delivery import DECODE_BATCH, ingest_delivery

    delivery = _png_delivery(tmp_path / "landing" / "v" / "b")
    local = ingest_delivery(delivery, ("cat", "dog"), 32, 3)
    on_ray = ingest_delivery(delivery, ("cat", "dog"), 32, 3, engine=Engine("ray"))
    assert local.n_delivered == 607 > 2 * DECODE_BATCH  # the Ray batches come back in any order
    pd.testing.assert_frame_equal(on_ray.accepted, local.accepted)
    pd.testing.assert_frame_equal(on_ray.quarantine, local.quarantine)
    assert on_ray.images.dtype == local.images.dtype == np.uint8
    np.testing.assert_array_equal(on_ray.images, local.images)
    assert local.images.shape == (600, 32, 32, 3) and on_ray.reconciles
    reasons = dict(zip(on_ray.quarantine["image"], on_ray.quarantine["reason"]))
    assert reasons.pop("corrupt.png").startswith("cannot decode image")
    assert reasons == {
        "blank.png": "image is blank: every pixel has the same value (90, 90, 90)",
        "tiny.png": "image too small (5x5 px; min_image_side 8 px)",
        "p0002.png": "duplicate image row (first at row 3)",
        "copy.png": "same image content as row 2, with another label (dog)",
        "p0003.png": "unknown class 'horse'",
        "gone.png": "image file not found",
    }


def _kill_every_decoder(stop: threading.Event, killed: list) -> None:
    """Until ``stop``: SIGKILL each Ray worker process running a decode task (Ray titles a busy worker
    after its task), every attempt of it, so that the task exhausts its retries."""
    import psutil

    while not stop.is_set():
        for process in _busy_ray_workers("_decode_batch"):
            try:
                process.send_signal(signal.SIGKILL)  # a real kill of the real worker process
                killed.append(process.pid)
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.01)


def test_a_delivery_whose_decoders_keep_dying_fails_naming_it_and_writes_nothing(small_home, ray_cluster):
    """The ingestion asset on engine ray: a delivery decodes on Ray as it would here; another, whose
    decoding worker is killed at every attempt, fails after Ray's retries naming the delivery and the
    cause, and neither its curated rows, its quarantine nor its record is written."""
    from dataclasses import replace

    import dagster as dg

    from assets.ingestion import vendor_delivery
    from ml.config import load_settings, write_settings
    from ml.delivery import Delivery, read_state
    from ml.ray_ingest import RETRIES, RayIngestError
    from pipelines.resources import AuditHome

    write_settings(small_home, replace(load_settings(small_home), engine="ray"))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("deliveries", ["a.batch-001", "b.batch-001"])
    home = AuditHome(home=str(small_home))
    done = dg.materialize([vendor_delivery], partition_key="a.batch-001", instance=instance,
                          resources={"audit_home": home})
    metadata = done.asset_materializations_for_node("vendor_delivery")[0].metadata
    assert metadata["decoded_by"].value == "ray" and metadata["n_accepted"].value == 60
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_every_decoder, args=(stop, killed))
    killer.start()
    try:
        with pytest.raises(RayIngestError, match=r"^delivery b\.batch-001: decoding on Ray failed with 0 of 60 image "
                                                 r"files decoded: ") as raised:
            dg.materialize([vendor_delivery], partition_key="b.batch-001", instance=instance,
                           resources={"audit_home": home})
    finally:
        stop.set()
        killer.join()
    assert len(set(killed)) > RETRIES  # the first attempt and every retry were killed
    assert "worker died" in str(raised.value)  # the cause, as Ray gives it
    delivery = Delivery("b", "batch-001", small_home / "landing" / "b" / "batch-001")
    assert not (home.curated / "b").exists() and not (home.quarantine / "b").exists()
    assert read_state(home.delivery_state, delivery) is None
