"""``vendor-audit checkout``: restore a past dataset version in curated/."""

from __future__ import annotations

from pipelines.audit_run import audit_lock


def register(add) -> None:
    p = add("checkout", "restore a past dataset version in curated/ (git restore of curated.dvc, then dvc checkout)")
    p.add_argument("--dataset-version", required=True, metavar="VERSION",
                   help="a version listed by vendor-audit datasets (a unique prefix is enough), or latest "
                        "(no default: required)")
    p.set_defaults(handler=checkout, needs_home=True)


def checkout(args) -> int:
    from pipelines.resources import AuditHome, DvcRepo

    dvc = DvcRepo(audit_home=AuditHome(home=str(args.home)))
    with audit_lock(args.home):  # not under a running audit
        version = dvc.checkout_dataset(args.dataset_version)
    if dvc.checked_out_version() is None:
        print(f"dataset {version} (the latest) is in {args.home / 'curated'}; vendor-audit run ingests new deliveries "
              "again")
    else:
        print(f"dataset {version} restored in {args.home / 'curated'}; vendor-audit run --home {args.home} re-scores it "
              f"(no ingestion while a past version is checked out); vendor-audit checkout --home {args.home} "
              "--dataset-version latest returns to the latest")
    return 0
