"""``vendor-audit screenshots``: the Dagster lineage, the MLflow run comparison and the report's trend
plots as PNG files."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("vendor_audit")


def register(add) -> None:
    p = add("screenshots", "screenshot the Dagster lineage, the MLflow run comparison and the report's trend plots "
                           "(headless Chromium)")
    p.add_argument("--out", type=Path, default=Path("docs/img"), help="folder the PNG files are written to")
    p.set_defaults(handler=screenshots, needs_home=True)


def screenshots(args) -> None:
    from pipelines.screenshots import take_screenshots

    for path in take_screenshots(args.home, args.out, args.home / "logs"):
        log.info("wrote %s", path)
