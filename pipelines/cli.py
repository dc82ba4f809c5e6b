"""``vendor-audit``: simulate deliveries, run the audit, open the UIs, benchmark. The parser's root and
the exit statuses; each command is a module of :mod:`pipelines.commands`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from importlib import import_module
from pathlib import Path

from pipelines.commands import COMMAND_MODULES
from pipelines.console import console_logging
from pipelines.home import default_home, require_home


class _HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default: ``off`` for a flag, the value otherwise, unless the
    help already says it (a default that depends on something else, or none)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or isinstance(action, (argparse._HelpAction,
                                                                                 argparse._VersionAction)):
            return text
        if action.nargs == 0:  # a flag: store_true, or --debug whose default is SUPPRESS after the command
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


def package_version() -> str:
    """The installed package's version (its metadata), or ``unknown`` when run from an uninstalled tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vendor-audit")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vendor-audit", description="Judge image-annotation vendors from their data.",
                                     formatter_class=_HelpWithDefaults,
                                     epilog="exit status: 0 all well; 1 infrastructure failure (tracking store, DVC, "
                                            "model files, a UI server that stopped on its own); 2 usage, settings "
                                            "or input error that stopped the run (a UI port in use); 3 the audit "
                                            "finished but some input had problems; 4 the audit finished and some "
                                            "vendor is in breach of its contract (run; 3 comes first; not with "
                                            "--no-breach-status); 128+N a UI stopped by signal N")
    debug_help = "show tracebacks and DEBUG logs"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                        help="show the version and exit")
    # also accepted after the command; SUPPRESS keeps a --debug given before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, under: argparse._SubParsersAction | None = None,
            group: bool = False) -> argparse.ArgumentParser | argparse._SubParsersAction:
        """A command's parser with --home and --debug, a command of the root or ``under`` a group's; with
        ``group``, a command group instead: the sub-commands its commands are added ``under``
        (``vendor-audit GROUP NAME``; --home is theirs)."""
        p = (sub if under is None else under).add_parser(name, help=help_text, description=help_text,
                                                         parents=[common], formatter_class=_HelpWithDefaults)
        if group:
            return p.add_subparsers(dest="command", required=True)
        p.add_argument("--home", type=lambda s: Path(s).expanduser().resolve(), default=default_home(),
                       help="data home: landing/, curated data, DVC, MLflow, Dagster, reports/ "
                            "(default: $VENDOR_AUDIT_HOME or ./home)")
        return p

    for module in COMMAND_MODULES:
        import_module(f"pipelines.commands.{module}").register(add)
    return parser


def _error(args, message: str, status: int) -> int:
    """Print one error line (the traceback before it with --debug) and return the exit status."""
    if getattr(args, "debug", False):
        traceback.print_exc()
    elif status == 1:
        message += " (--debug shows the traceback)"
    print(f"vendor-audit: error: {message}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 all well; 1 infrastructure failure; 2 usage, settings or input error that stopped
    the run; 3 the audit finished but some input had problems (a delivery rejected whole, a failed check);
    4 the audit finished and some vendor is in breach of its contract (``run``, ``demo``; 3 comes first;
    not with ``run --no-breach-status``); 128 + N a UI server stopped by signal N."""
    console_logging("vendor_audit", "pipelines")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = build_parser().parse_args(argv)
    if args.debug:
        console_logging("vendor_audit", "pipelines", "ml", level=logging.DEBUG)
    import dagster as dg

    from ml.check_plan import CheckPlanError
    from ml.config import ConfigError
    from ml.cvat_api import CvatError
    from ml.delivery import DeliveryError, TaxonomyChanged
    from ml.labelstudio_api import LabelStudioError
    from pipelines.resources import DvcError, TrackingUnavailable
    from pipelines.servers import ServerExited
    from pipelines.store import ModelFileError

    input_errors = (ConfigError, DeliveryError, TaxonomyChanged, CheckPlanError)
    try:
        if args.needs_home:  # it reads an existing home: simulate, demo, init and the benchmarks create theirs
            require_home(args.home)
        status = args.handler(args)
    except (*input_errors, ValueError, FileNotFoundError) as exc:
        return _error(args, str(exc), 2)
    except (TrackingUnavailable, DvcError, ModelFileError, ServerExited, LabelStudioError, CvatError) as exc:
        return _error(args, str(exc), 1)
    except dg.Failure as exc:
        return _error(args, exc.description, 1)
    except dg.DagsterExecutionStepExecutionError as exc:
        cause = exc.__cause__ or exc
        return _error(args, f"in {exc.step_key}: {cause}", 2 if isinstance(cause, input_errors) else 1)
    except Exception as exc:  # noqa: BLE001 - anything else: one line, the traceback with --debug
        return _error(args, f"{exc.__class__.__name__}: {exc}", 1)
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
