"""``vendor-audit plan``: draw the next hand-check plan from the current audit."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipelines.audit_run import audit_lock


def register(add) -> None:
    p = add("plan", "draw the next hand-check plan: reports/check_plan.csv and check_plan.md list the images to check")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--budget", type=float, metavar="N",
                      help="expected checks per vendor in this plan (no default: --budget or --halfwidth is required)")
    size.add_argument("--halfwidth", type=float, metavar="H",
                      help="per vendor, the checks expected to give a 95%% interval of +-H, e.g. 0.02 "
                           "(no default: --budget or --halfwidth is required)")
    p.set_defaults(handler=plan, needs_home=True)


def plan(args) -> int:
    print_plan(args.home, make_plan(args.home, budget=args.budget, halfwidth=args.halfwidth))
    return 0


def make_plan(home: Path, budget: float | None = None, halfwidth: float | None = None):
    """Draw and write the next check plan of ``home`` from its current audit (see ``vendor-audit plan``);
    returns the :class:`ml.check_plan.CheckPlan`."""
    from ml.check_plan import (
        CheckPlanError, check_plan_markdown, collect_answers, draw_check_plan, read_plans, write_check_plan,
    )
    from ml.checks import read_checks, read_gold
    from ml.config import load_settings
    from ml.delivery import load_curated_rows
    from ml.report import load_issue_images
    from pipelines.resources import AuditHome, DvcRepo

    settings = load_settings(home)
    issues_path = home / "reports" / "label_issues.csv"
    # the audit rewrites label_issues.csv and the plan numbers must not collide: one at a time
    with audit_lock(home):
        if not issues_path.is_file():
            raise CheckPlanError(f"{issues_path}: no audit yet: run vendor-audit run --home {home} first; the plan "
                                 "is drawn from its per-image probabilities of error")
        issues = pd.read_csv(issues_path, dtype=str, keep_default_na=False)
        rows = load_curated_rows(home / "curated")
        rows = rows[rows["image_id"].isin(issues["image_id"])]
        checks, _ = read_checks(home / "checks", settings.classes, pd.Index(issues["image_id"]))
        gold, _ = read_gold(home / "gold", settings.classes)
        answers = collect_answers(rows, checks, gold)
        scorecard_path = home / "reports" / "scorecard.csv"
        current = (pd.read_csv(scorecard_path).set_index("vendor")["error_rate"].to_dict()
                   if scorecard_path.is_file() else None)
        check_plan = draw_check_plan(issues, set(answers["image_id"]),
                                     set(answers.loc[answers["kind"] == "gold", "image_id"]),
                                     read_plans(home / "plans"), budget=budget, halfwidth=halfwidth,
                                     current_rate=current)
        listed = issues[issues["image_id"].isin(check_plan.to_check["image_id"])]
        markdown, files = check_plan_markdown(check_plan, load_issue_images(home / "curated", listed))
        write_check_plan(home / "plans", home / "reports", check_plan, markdown, files)
        # the plan is the record of the design the estimate relies on: versioned as soon as it exists
        DvcRepo(audit_home=AuditHome(home=str(home))).snapshot_folders(["plans"])
    return check_plan


def print_plan(home: Path, check_plan) -> None:
    shown = check_plan.vendors.copy()
    for column in ("error_rate", "expected_low", "expected_high"):
        shown[column] = shown[column].map(lambda x: f"{100 * x:.1f}%" if pd.notna(x) else "n/a")
    print(f"check plan {check_plan.number:03d}: {home / 'plans' / f'plan-{check_plan.number:03d}.csv'}")
    print(shown.rename(columns={"n_images": "images", "to_check": "to_check_now", "error_rate": "rate_now",
                                "expected_low": "expected_95%_low", "expected_high": "expected_95%_high"})
          .to_string(index=False))
    print(f"\n{len(check_plan.to_check)} images to check: {home / 'reports' / 'check_plan.csv'} "
          f"(thumbnails: {home / 'reports' / 'check_plan.md'})")
    print(f"answers: {home / 'checks'}/<name>.csv with columns image_id,true_labels (several classes: a|b), "
          f"then vendor-audit run --home {home}")
