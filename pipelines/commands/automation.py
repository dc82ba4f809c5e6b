"""``vendor-audit automation``: turn the home's sensors and nightly schedule on or off, or list their state."""

from __future__ import annotations

import os

from pipelines.home import open_instance, require_home


def register(add) -> None:
    p = add("automation", "turn the home's sensors and nightly schedule on or off, or list their state (they run "
                          "while the Dagster daemon runs: vendor-audit ui starts it)")
    p.add_argument("action", nargs="?", choices=["on", "off", "status"], default="status",
                   help="on, off, or status: each one's state")
    p.add_argument("names", nargs="*", metavar="NAME",
                   help="only these sensors or schedules (default: all of them: delivery_sensor, "
                        "scorecard_refresh_sensor, checks_sensor, scorecard_automation, nightly_audit)")
    p.set_defaults(handler=automation, needs_home=True)


def automation(args) -> int:
    """Turn the home's sensors and schedule on or off, or list their state, through the ``dagster``
    command line on the home's instance (in parallel: each call loads the code location, seconds)."""
    import subprocess

    from pipelines.definitions import defs
    from pipelines.servers import dagster_cli_command

    require_home(args.home, settings_file=True)
    open_instance(args.home)
    kinds = {**{s.name: "sensor" for s in defs.sensors}, **{s.name: "schedule" for s in defs.schedules}}
    unknown = [name for name in args.names if name not in kinds]
    if unknown:
        raise ValueError(f"unknown sensor or schedule {', '.join(unknown)}: the home has {', '.join(kinds)}")
    if args.action == "status":
        calls = [("sensor", "list"), ("schedule", "list")]
    elif args.names or args.action == "off":  # `dagster ... stop` takes one name at a time
        calls = [(kinds[name], "start" if args.action == "on" else "stop", name) for name in args.names or kinds]
    else:
        calls = [("sensor", "start", "--start-all"), ("schedule", "start", "--start-all")]
    processes = []
    for words in calls:
        command, env = dagster_cli_command(args.home, *words)
        processes.append(subprocess.Popen(command, env=dict(os.environ, **env), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    failed = []
    for words, process in zip(calls, processes):
        out, err = process.communicate()
        if process.returncode:
            failed.append(f"dagster {' '.join(words)}: {(err.strip().splitlines() or ['exit status ' + str(process.returncode)])[-1]}")
        # dagster's answer without its code server's log lines and its underlines of asterisks
        print("\n".join(line for line in out.splitlines()
                        if line.strip() and not set(line) <= {"*"} and "dagster.code_server" not in line))
    if failed:
        raise RuntimeError("; ".join(failed))
    if args.action == "on":
        print(f"they run while the Dagster daemon runs: vendor-audit ui --home {args.home} starts it (with the UI)")
    return 0
