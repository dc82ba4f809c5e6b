"""``vendor-audit ui`` and ``mlflow-ui``: the Dagster and MLflow servers on the home, until stopped."""

from __future__ import annotations

import logging

from pipelines.home import open_instance, require_home

log = logging.getLogger("vendor_audit")


def register(add) -> None:
    for name, help_text, port, handler in (
            ("ui", "start the Dagster UI (dg dev: webserver and daemon) on this home", 3000, ui),
            ("mlflow-ui", "start the MLflow UI on this home's tracking store", 5000, mlflow_ui)):
        p = add(name, help_text)
        p.add_argument("--host", default="127.0.0.1", help="address the server listens on")
        p.add_argument("--port", type=int, default=port, help="port the server listens on")
        p.set_defaults(handler=handler, needs_home=True)


def ui(args) -> int:
    """Run ``dg dev`` on the home until this process gets SIGTERM, SIGINT or SIGHUP, which stops dagster's
    whole process group (webserver, daemon, code server); exits 128 + the signal
    (:func:`pipelines.servers.supervise`)."""
    from ml.config import load_settings
    from pipelines.servers import check_port_free, dagster_dev_command, supervise

    require_home(args.home, settings_file=True)  # never create a stray home from a mistyped path
    load_settings(args.home)
    check_port_free(args.host, args.port)
    open_instance(args.home)
    command, env = dagster_dev_command(args.home, args.port, args.host)
    log.info("Dagster UI on http://%s:%d (home %s)", args.host, args.port, args.home)
    return supervise(command, env, "dg dev")


def mlflow_ui(args) -> int:
    """Run ``mlflow server`` on the home's tracking store, as :func:`ui` runs ``dg dev``."""
    from pipelines.servers import MODEL_TRAINING_VIEW, check_port_free, mlflow_server_command, supervise

    check_port_free(args.host, args.port)
    command, env = mlflow_server_command(args.home, args.port, args.host)
    log.info("MLflow UI on http://%s:%d/#/experiments?%s (home %s)", args.host, args.port, MODEL_TRAINING_VIEW,
             args.home)
    return supervise(command, env, "mlflow server")
