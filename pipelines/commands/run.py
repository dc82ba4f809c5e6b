"""``vendor-audit run``: ingest new deliveries and audit the vendors."""

from __future__ import annotations

from pipelines.audit_run import audit
from pipelines.summary import (
    contract_lines, format_summary, hand_check_lines, model_only_lines, print_scorecard, with_truth,
)


def register(add) -> None:
    p = add("run", "ingest new deliveries and audit the vendors")
    p.add_argument("--wide", action="store_true", help="print every scorecard column, not only the main ones")
    p.add_argument("--retrain", action="store_true", help="retrain and re-score even if no delivery is new")
    p.add_argument("--rescore", action="store_true",
                   help="re-estimate label issues and the scorecard with the champion model even if nothing is new "
                        "(after upgrading vendor-audit, say); no retraining")
    p.add_argument("--ingest-only", action="store_true",
                   help="only ingest new deliveries and version the data with DVC, no scoring (the ingest stage "
                        "of the home's dvc.yaml)")
    p.add_argument("--no-breach-status", action="store_true",
                   help="a vendor in breach of its contract does not make the exit status 4 (the home's dvc.yaml "
                        "audit stage: a breach lasts, and would fail every dvc repro)")
    p.set_defaults(handler=run, needs_home=True)


def run(args) -> int:
    """Exit status 0: all well; 3: the audit finished but some input had problems; 4: the audit finished
    and some vendor is in breach of its contract (unless ``--no-breach-status``; 3 comes first)."""
    from ml.contract import BREACH, vendors_by_verdict
    from ml.delivery import DeliveryError

    ingest_only = getattr(args, "ingest_only", False)
    done = audit(args.home, retrain=args.retrain, debug=args.debug, ingest_only=ingest_only,
                 rescore=getattr(args, "rescore", False))
    if ingest_only:
        print("\n".join(format_summary(done.summary)))
        return 3 if done.summary.input_problems else 0
    if done.scorecard is not None:
        print_scorecard(with_truth(done.scorecard, args.home), wide=getattr(args, "wide", False))
    else:
        print("no scorecard: no delivery is curated yet")
    breach = done.scorecard is not None and bool(vendors_by_verdict(done.scorecard)[BREACH])
    breach_status = breach and not getattr(args, "no_breach_status", False) and not done.summary.input_problems
    contract, basis = (contract_lines(done.scorecard, args.home, breach_status), model_only_lines(done.scorecard)) \
        if done.scorecard is not None else ([], [])
    print("\n" + "\n".join(format_summary(done.summary, hand_check_lines(args.home), contract, basis)))
    reports = args.home / "reports"
    if done.scorecard is not None:  # last, where the eye lands: the files to open
        print(f"\ntables: {reports} (scorecard.csv, label_issues.csv, comparisons.csv)\n"
              f"report: {reports / 'report.md'}\n        {reports / 'report.html'}")
    if done.summary.input_problems:
        return 3
    if done.scorecard is None:
        raise DeliveryError(f"{args.home / 'landing'}: nothing to audit: no delivery is curated yet "
                            "(a complete delivery ends with a _READY file)")
    return 4 if breach_status else 0
