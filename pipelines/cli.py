"""``vendor-audit``: simulate deliveries, run the audit, open the UIs, benchmark."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import pandas as pd

DEFAULT_VENDORS = "a=0.0,b=0.05,c=0.2"
DAGSTER_YAML = """\
telemetry:
  enabled: false
concurrency:
  pools:
    default_limit: 1  # the 'dvc' pool: one DVC operation at a time per repository
python_logs:
  managed_python_loggers: [ml]
  python_log_level: INFO
"""

log = logging.getLogger("vendor_audit")


def default_home() -> Path:
    return Path(os.environ.get("VENDOR_AUDIT_HOME") or Path.cwd() / "home")


def open_instance(home: Path):
    """The home's Dagster instance (SQLite storage under ``home/dagster``), the one ``dagster dev`` shows."""
    import dagster as dg

    dagster_home = home / "dagster"
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.is_file():
        config.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    return dg.DagsterInstance.from_config(str(dagster_home))


def run_audit(home: Path, retrain: bool = False) -> pd.DataFrame:
    """Ingest and score every new complete delivery, then refresh the scorecard; train when there is
    no model yet or ``retrain`` is asked. Returns the scorecard."""
    from ml.config import load_settings
    from pipelines.locks import exclusive

    load_settings(home)  # a missing or invalid settings file stops here, before anything runs
    # one audit of a home at a time: a second `run` (a batch landing mid-run, the schedule) waits,
    # then finds what the first left to do
    with exclusive(home / ".locks" / "run.lock", f"the audit of {home}"):
        return _run_audit_locked(home, retrain)


def _run_audit_locked(home: Path, retrain: bool) -> pd.DataFrame:
    from ml.delivery import changed_deliveries, load_curated_rows
    from pipelines.store import champion_outputs
    from pipelines.automation import new_deliveries, pending_deliveries
    from pipelines.definitions import build_definitions
    from pipelines.resources import AuditHome, MlflowTracking

    instance = open_instance(home)
    defs = build_definitions(str(home))
    audit_home = AuditHome(home=str(home))
    added = new_deliveries(instance, audit_home)
    if added:
        instance.add_dynamic_partitions("deliveries", added)
    keys = pending_deliveries(audit_home)  # new ones, and any whose ingestion was interrupted
    ingest = defs.resolve_job_def("ingest_deliveries")
    for number, key in enumerate(keys, start=1):
        log.info("ingesting delivery %s (%d of %d)", key, number, len(keys))
        ingest.execute_in_process(instance=instance, partition_key=key)
    for key in changed_deliveries(audit_home.landing, audit_home.curated):
        log.error("delivery %s changed in the landing folder after it was ingested: the change is ignored "
                  "(ingested rows are never replaced); deliver it again under a new batch name", key)
    scorecard_path = home / "reports" / "scorecard.csv"
    champion = MlflowTracking(audit_home=audit_home).champion()
    has_model = champion is not None
    if has_model and not retrain:  # deliveries whose scoring failed earlier (the model store was down...)
        rows = load_curated_rows(audit_home.curated)
        for key in champion_outputs(audit_home.root, champion, rows)[2]:
            log.info("scoring delivery %s with the champion model v%s", key, champion["model_version"])
            ingest.execute_in_process(instance=instance, partition_key=key)
            keys.append(key)
    if retrain or not has_model:
        log.info("auditing: dataset snapshot, training, label issues, scorecard")
        config = {"ops": {"cv_models": {"config": {"force": retrain}}}}
        defs.resolve_job_def("audit_vendors").execute_in_process(instance=instance, run_config=config)
    elif keys or not scorecard_path.is_file():
        log.info("scoring with the champion model: dataset snapshot, label issues, scorecard")
        defs.resolve_job_def("score_vendors").execute_in_process(instance=instance)
    else:
        log.info("nothing new under %s: the scorecard is current", home / "landing")
    return pd.read_csv(scorecard_path)


def with_truth(scorecard: pd.DataFrame, home: Path) -> pd.DataFrame:
    """Add the simulation's true error rate per vendor when ``home/truth.csv`` exists."""
    truth_path = home / "truth.csv"
    if not truth_path.is_file():
        return scorecard
    truth = pd.read_csv(truth_path, dtype=str, keep_default_na=False)
    issues = pd.read_csv(home / "reports" / "label_issues.csv", dtype=str, keep_default_na=False)
    if "true_labels" not in truth.columns:  # a truth file with one true label per image
        truth["true_labels"] = truth["true_label"]
    merged = issues.merge(truth[["image_id", "true_labels"]], on="image_id", how="inner")
    # the given label is wrong only when it is outside the set of true labels (ambiguous images)
    wrong = [given not in labels.split("|") for given, labels in zip(merged["given_label"], merged["true_labels"])]
    true_rate = pd.Series(wrong, index=merged.index).groupby(merged["vendor"]).mean().round(4)
    return scorecard.assign(true_error_rate=scorecard["vendor"].map(true_rate))


def _simulate(args) -> None:
    from ml.datasets import load_dataset
    from ml.simulate import parse_vendor_rates, simulate_deliveries

    data = load_dataset(args.dataset)
    truth = simulate_deliveries(data, parse_vendor_rates(args.vendors), args.per_vendor, args.home,
                                seed=args.seed, batch=args.batch, noise=args.noise, ambiguous=args.ambiguous)
    log.info("wrote %d images for %d vendors under %s", len(truth), truth["vendor"].nunique(), args.home / "landing")


def _demo(args) -> None:
    _simulate(args)
    args.retrain = False
    _run(args)


def _run(args) -> None:
    scorecard = run_audit(args.home, retrain=args.retrain)
    print(with_truth(scorecard, args.home).to_string(index=False))
    print(f"\nreports: {args.home / 'reports'}")


def _ui(args) -> None:
    """Run ``dagster dev`` on the home until it exits or this process gets SIGTERM or SIGINT, which is
    forwarded to dagster's whole process group (webserver, daemon, code server); whatever is left of
    the group after a grace period is killed. Exits with dagster's status, or 128 + the signal."""
    import signal
    import subprocess
    import time

    from ml.config import CONFIG_NAME, load_settings

    grace = 20.0  # seconds for dagster to shut down its children before SIGKILL
    if not (args.home / CONFIG_NAME).is_file():  # never create a stray home from a mistyped path
        raise ValueError(f"{args.home} is not a vendor-audit home (no {CONFIG_NAME}): create one with "
                         f"vendor-audit simulate --home {args.home} or write its settings file")
    load_settings(args.home)
    open_instance(args.home)
    env = dict(os.environ, VENDOR_AUDIT_HOME=str(args.home), DAGSTER_HOME=str(args.home / "dagster"))
    command = [sys.executable, "-m", "dagster", "dev", "-m", "pipelines.definitions", "-h", args.host,
               "-p", str(args.port)]
    started: list[subprocess.Popen] = []
    received: list[tuple[int, float]] = []  # (signal, when)

    def signal_group(signum: int) -> bool:
        """Send ``signum`` to dagster's process group; False when the group has no process left."""
        try:
            os.killpg(started[0].pid, signum)
            return True
        except ProcessLookupError:
            return False

    def forward(signum, _frame) -> None:
        received.append((signum, time.monotonic()))
        if started:
            signal_group(signum)

    # handlers first, so a signal that arrives while dagster starts is forwarded too
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        # its own session: the terminal's Ctrl-C reaches it only through `forward`, and the group
        # is stopped as one
        started.append(subprocess.Popen(command, env=env, start_new_session=True))
        process = started[0]
        log.info("Dagster UI on http://%s:%d (home %s)", args.host, args.port, args.home)
        if received:  # a signal arrived while dagster was starting
            signal_group(received[-1][0])
        while process.poll() is None and not (received and time.monotonic() > received[0][1] + grace):
            try:
                process.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        if process.returncode is None:
            log.warning("dagster did not stop within %.0f s of the signal: killing its process group", grace)
            signal_group(signal.SIGKILL)
        elif signal_group(signal.SIGTERM):  # dagster exited but left processes of its group running
            deadline = time.monotonic() + grace
            while signal_group(0) and time.monotonic() < deadline:
                time.sleep(0.2)
            signal_group(signal.SIGKILL)
        process.wait()
    finally:
        if started and started[0].returncode is None:  # an unexpected error here: leave nothing running
            signal_group(signal.SIGKILL)
            started[0].wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:  # stopped by a signal: the shell's convention, 143 for SIGTERM, 130 for Ctrl-C
        sys.exit(128 + received[0][0])
    sys.exit(process.returncode if process.returncode >= 0 else 128 - process.returncode)


def _mlflow_ui(args) -> None:
    import subprocess

    store = args.home / "mlflow"
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
               "--default-artifact-root", (store / "artifacts").as_uri(), "--host", args.host, "--port", str(args.port),
               "--workers", "1"]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    sys.exit(subprocess.call(command, env=env))


def _without_paths(argv: list[str]) -> list[str]:
    """Command-line words without ``--home DIR`` and ``--output FILE`` (machine-specific paths), for
    reproduce lines."""
    kept, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in ("--home", "--output"):
            skip = True
        elif not word.startswith(("--home=", "--output=")):
            kept.append(word)
    return kept


def _bench(args) -> None:
    import shlex
    import time

    from ml.bench import BenchConfig, format_tables, run_benchmark

    _console_logging("ml")
    config = BenchConfig(seeds=args.seeds, folds=args.folds, epochs=args.epochs, head=args.head,
                         bootstrap=args.bootstrap, cache=args.home / "bench-cache")
    started = time.perf_counter()
    summaries = run_benchmark([k.strip() for k in args.scenarios.split(",")], config)
    tables = format_tables(summaries)
    print(tables)
    command = "vendor-audit bench " + " ".join(shlex.quote(a) for a in _without_paths(sys.argv[2:]))
    text = (f"## `{command.strip()}`\n\n"
            f"Model: K={args.folds}-fold {args.head} CNN, {args.epochs} epochs on Fashion-MNIST (20 on digits), CPU; "
            f"{(time.perf_counter() - started) / 60:.0f} min for this run. Each cell: ours \\| cleanlab's defaults "
            f"on the same out-of-fold probabilities.\n\n" + tables)
    from ml.report import write_section

    write_section(args.output, "bench", text)
    log.info("wrote %s", args.output)


def _bench_incremental(args) -> None:
    import shlex

    from ml.report import write_section
    from pipelines.incremental_bench import format_incremental, run_incremental_benchmark

    overrides = {"folds": args.folds, "epochs": args.epochs, "heads": tuple(args.heads.split(","))}
    rows = run_incremental_benchmark(args.home, [int(c) for c in args.checkpoints.split(",")], args.per_batch,
                                     args.full_up_to, overrides, run_audit)
    command = "vendor-audit bench-incremental " + " ".join(shlex.quote(a) for a in _without_paths(sys.argv[2:]))
    text = format_incremental(rows, command.strip(), f"{args.per_batch} images a batch, "
                              f"{args.folds}-fold {args.heads} training, {args.epochs} epochs, CPU")
    print(text)
    write_section(args.output, "bench-incremental", text)


def _screenshots(args) -> None:
    from pipelines.screenshots import take_screenshots

    for path in take_screenshots(args.home, args.out, args.home / "logs"):
        log.info("wrote %s", path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vendor-audit", description="Judge image-annotation vendors from their data.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--home", type=lambda s: Path(s).expanduser().resolve(), default=default_home(),
                       help="data home: landing/, curated data, DVC, MLflow, Dagster, reports/ (default: $VENDOR_AUDIT_HOME or ./home)")
        return p

    for name, help_text in (("simulate", "write simulated vendor deliveries with known wrong labels"),
                            ("demo", "simulate the reference case and run the audit")):
        p = add(name, help_text)
        p.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist")
        p.add_argument("--vendors", default=DEFAULT_VENDORS, help="name=error_rate,... (default %(default)s)")
        p.add_argument("--per-vendor", type=int, default=2000)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--batch", default="batch-001")
        p.add_argument("--noise", choices=["uniform", "pairs"], default="uniform",
                       help="wrong labels: any other class, or swaps of confusable class pairs")
        p.add_argument("--ambiguous", type=float, default=0.0,
                       help="share of images composed of two classes (their truth is both)")
    p = add("run", "ingest new deliveries and audit the vendors")
    p.add_argument("--retrain", action="store_true", help="retrain and re-score even if no delivery is new")
    p = add("bench", "benchmark the estimates against the truth and cleanlab; writes BENCHMARKS.md")
    p.add_argument("--scenarios", default="A,B,C,D,E,W")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--head", choices=["softmax", "l2softmax"], default="l2softmax")
    p.add_argument("--bootstrap", type=int, default=100)
    p.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"),
                   help="Markdown file whose bench section is replaced (created if missing)")
    p = add("bench-incremental", "time new-batch scoring against full re-runs as batches accumulate")
    p.add_argument("--checkpoints", default="1,5,20")
    p.add_argument("--per-batch", type=int, default=2000)
    p.add_argument("--full-up-to", type=int, default=20, help="largest checkpoint that also times a full re-run")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--heads", default="softmax,l2softmax")
    p.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"),
                   help="Markdown file whose bench-incremental section is replaced (created if missing)")
    p = add("screenshots", "screenshot the Dagster lineage and the MLflow run comparison (headless Chromium)")
    p.add_argument("--out", type=Path, default=Path("docs/img"))
    for name, help_text, port in (("ui", "start the Dagster UI (dagster dev) on this home", 3000),
                                  ("mlflow-ui", "start the MLflow UI on this home's tracking store", 5000)):
        p = add(name, help_text)
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=port)
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each line (tests and tools replace it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _console_logging(*names: str) -> None:
    """Log these loggers' INFO lines to stderr, once per process, and not again through the root
    logger (which some libraries configure). ml's own lines reach the console through Dagster's managed
    loggers during runs."""
    for name in names:
        logger = logging.getLogger(name)
        if any(getattr(h, "vendor_audit", False) for h in logger.handlers):
            continue
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.vendor_audit = True
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    _console_logging("vendor_audit", "pipelines")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = build_parser().parse_args(argv)
    import dagster as dg

    from ml.config import ConfigError
    from ml.delivery import DeliveryError
    from pipelines.resources import DvcError, TrackingUnavailable
    from pipelines.store import ModelFileError

    commands = {"simulate": _simulate, "demo": _demo, "run": _run, "bench": _bench,
                "bench-incremental": _bench_incremental, "screenshots": _screenshots, "ui": _ui,
                "mlflow-ui": _mlflow_ui}
    try:
        commands[args.command](args)
    except (ConfigError, DeliveryError, ValueError, FileNotFoundError) as exc:
        print(f"vendor-audit: error: {exc}", file=sys.stderr)
        return 2
    except (TrackingUnavailable, DvcError, ModelFileError) as exc:
        print(f"vendor-audit: error: {exc}", file=sys.stderr)
        return 1
    except dg.Failure as exc:
        print(f"vendor-audit: error: {exc.description}", file=sys.stderr)
        return 1
    except dg.DagsterExecutionStepExecutionError as exc:
        cause = exc.__cause__ or exc
        print(f"vendor-audit: error in {exc.step_key}: {cause}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
