"""``vendor-audit demo``: simulate the reference case and run the audit, optionally with answered hand checks."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipelines.commands.plan import make_plan, print_plan
from pipelines.commands.run import run
from pipelines.commands.simulate import add_simulation_options, simulate
from pipelines.summary import run_status


def register(add) -> None:
    p = add("demo", "simulate the reference case and run the audit")
    add_simulation_options(p)
    p.add_argument("--wide", action="store_true", help="print every scorecard column, not only the main ones")
    p.add_argument("--checks", type=int, default=None, metavar="N",
                   help="then plan N hand checks per vendor, answer them from the simulated truth "
                        "(checks/demo.csv) and run again (default: none, no hand checks)")
    p.set_defaults(handler=demo, needs_home=False)


def demo(args) -> int:
    """``simulate`` and ``run``; with ``--checks N``, then a plan of N checks per vendor answered from the
    simulation's truth into checks/demo.csv, and ``run`` again."""
    if args.checks is not None and args.checks < 1:
        raise ValueError(f"--checks must be a number of checks per vendor >= 1 (got {args.checks})")
    simulate(args)
    args.retrain = False
    status = run(args)
    if args.checks is None:
        return status
    check_plan = make_plan(args.home, budget=args.checks)
    print_plan(args.home, check_plan)
    path = answer_demo_checks(args.home, check_plan.to_check)
    print(f"\nanswered {len(check_plan.to_check)} planned images from the simulated truth: {path}\n")
    return run_status(status, run(args))


def answer_demo_checks(home: Path, to_check: pd.DataFrame) -> Path:
    """Answer every image of ``to_check`` from ``home/truth.csv`` into ``home/checks/demo.csv`` (added to
    the answers already there): the demo's perfect checker. Returns the file's path."""
    from ml.check_plan import answers_from_truth
    from ml.files import atomic_write_csv
    from ml.simulate import TRUTH_FILE

    truth_path = home / TRUTH_FILE
    if not truth_path.is_file():
        raise FileNotFoundError(f"{truth_path}: no simulated truth to answer the checks from")
    answers = answers_from_truth(to_check, pd.read_csv(truth_path, dtype=str, keep_default_na=False))
    path = home / "checks" / "demo.csv"
    if path.is_file():
        earlier = pd.read_csv(path, dtype=str, keep_default_na=False)
        answers = pd.concat([earlier, answers[~answers["image_id"].isin(earlier["image_id"])]], ignore_index=True)
    atomic_write_csv(path, answers)
    return path
