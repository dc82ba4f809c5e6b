"""``vendor-audit init``: a new home for your own deliveries."""

from __future__ import annotations

from ml.wording import count
from pipelines.home import open_instance, require_environment


def register(add) -> None:
    p = add("init", "create a home for your own deliveries: a commented settings file with your classes, and "
                    "landing/")
    p.add_argument("--classes", required=True, metavar="NAME,NAME,...",
                   help="the class names in order, comma-separated (no default: required)")
    p.add_argument("--dagster-postgres-env", default="", metavar="VAR",
                   help="keep the home's Dagster runs, event log and schedules on PostgreSQL, at the URL the "
                        "environment variable VAR holds (postgresql+psycopg2://user:password@host:5432/database; "
                        "every command on the home needs it set); default: SQLite under DIR/dagster")
    p.set_defaults(handler=init, needs_home=False)


def init(args) -> int:
    """A new home for real deliveries: the commented settings file with the given classes, and landing/."""
    from ml.config import CONFIG_NAME, make_settings, write_settings

    settings_path = args.home / CONFIG_NAME
    if settings_path.exists():
        raise ValueError(f"{settings_path} exists already: {args.home} is a vendor-audit home (edit that file to "
                         "change its settings)")
    settings = make_settings("--classes", classes=args.classes.split(","))
    require_environment(args.dagster_postgres_env)  # before anything is written
    (args.home / "landing").mkdir(parents=True, exist_ok=True)
    write_settings(args.home, settings)
    # its Dagster instance, so that dagster's own command lines work on it at once
    open_instance(args.home, postgres_url_env=args.dagster_postgres_env)
    print(f"new home {args.home}: settings in {settings_path} ({count(len(settings.classes), 'class')}; every "
          f"setting is explained there)\n"
          f"deliveries go to {args.home / 'landing'}/<vendor>/<batch>/: labels.csv (image,label), the images, and "
          f"_READY written last\nthen: vendor-audit run --home {args.home}")
    return 0
