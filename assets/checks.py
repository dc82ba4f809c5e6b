"""Hand-check answers (checks/) and gold images (gold/): validated, matched to the delivered images,
versioned with DVC."""

import dagster as dg
import pandas as pd

from assets.dataset import curated_dataset
from ml.check_plan import (
    answer_file_rows, answers_fingerprint, chosen_answers, collect_answers, write_answers_state,
)
from ml.checks import GOLD_SUFFIXES, read_checks, read_gold, write_check_quarantine
from ml.delivery import DeliveryError, load_curated_rows
from ml.files import atomic_write_csv
from pipelines.locks import DVC_POOL
from pipelines.resources import AuditHome, DvcRepo


@dg.asset(
    deps=[curated_dataset],
    group_name="vendor_audit",
    kinds={"csv", "dvc"},
    pool=DVC_POOL,  # DVC runs one operation at a time per repository
    description="Hand-check answers (checks/*.csv: image_id, true_labels) and gold images (gold/*.csv: sha256, "
                "true_labels) validated row by row (rejected rows in quarantine/checks/ and quarantine/gold/ with "
                "the reason) and matched to the delivered images: reports/hand_checks.csv. checks/, gold/ and "
                "plans/ are versioned with DVC.",
    check_specs=[dg.AssetCheckSpec("answers_reconcile", asset="hand_checks",
                                   description="accepted + quarantined = rows in the answer and gold files")],
)
def hand_checks(context: dg.AssetExecutionContext, audit_home: AuditHome, dvc: DvcRepo) -> dg.MaterializeResult:
    classes = audit_home.settings().classes
    # taken before reading: a file written while it is read is noticed by the next run or sensor tick
    fingerprint = answers_fingerprint(audit_home.checks, audit_home.gold)
    rows = load_curated_rows(audit_home.curated)
    checks, checks_quarantine = read_checks(audit_home.checks, classes, pd.Index(rows["image_id"]))
    gold, gold_quarantine = read_gold(audit_home.gold, classes)
    for kind, quarantine in (("checks", checks_quarantine), ("gold", gold_quarantine)):
        if (audit_home.landing / kind).is_dir():  # a vendor of that name: its deliveries' rejects are there too
            if answers_fingerprint(audit_home.root / kind):
                raise DeliveryError(f"{audit_home.landing / kind}: a vendor is named {kind!r}, like the quarantine "
                                    f"folder of the {kind}/ files (quarantine/{kind}/): rename that vendor's landing "
                                    f"folder to use {kind}/")
            continue  # no such file: nothing to write, and the vendor's quarantine files stay
        write_check_quarantine(audit_home.quarantine, kind, quarantine)
    answers = collect_answers(rows, checks, gold)
    atomic_write_csv(audit_home.reports / "hand_checks.csv", answers)
    versions = dvc.snapshot_folders(dvc.answer_folders())
    write_answers_state(audit_home.checks_state, read=fingerprint, versions=versions)

    n_rows = answer_file_rows(audit_home.checks, "image_id") + answer_file_rows(audit_home.gold, "sha256", GOLD_SUFFIXES)
    accepted = len(checks) + len(gold)
    quarantined = len(checks_quarantine) + len(gold_quarantine)
    used = chosen_answers(answers)
    disagreeing = _gold_disagreements(answers)
    unmatched_gold = int((~gold["sha256"].isin(rows["sha256"].str.lower())).sum())
    if quarantined:
        context.log.warning(f"hand checks: {quarantined} answer rows quarantined (quarantine/checks/, quarantine/gold/)")
    if disagreeing:
        context.log.warning(f"hand checks: {disagreeing} images answered in checks/ differently from their gold answer "
                            "(gold's answer is used)")
    context.log.info(f"hand checks: {len(used)} images checked ({int((used['kind'] == 'gold').sum())} by gold)")
    reasons = pd.concat([checks_quarantine, gold_quarantine])["reason"].value_counts().to_dict()
    return dg.MaterializeResult(
        metadata={
            "n_answers": len(checks), "n_gold": len(gold), "n_quarantined": quarantined,
            "images_checked": len(used), "gold_images_matched": int((used["kind"] == "gold").sum()),
            "gold_answers_matching_no_image": unmatched_gold,
            "checks_disagreeing_with_gold": disagreeing,
            "quarantine_reasons": dg.MetadataValue.json(reasons),
            **{f"{folder}_version": version for folder, version in versions.items()},
            "path": dg.MetadataValue.path(str(audit_home.reports / "hand_checks.csv")),
        },
        check_results=[dg.AssetCheckResult(
            check_name="answers_reconcile", passed=accepted + quarantined == n_rows,
            metadata={"rows": n_rows, "accepted": accepted, "quarantined": quarantined})],
    )


def _gold_disagreements(answers: pd.DataFrame) -> int:
    """Images whose answer in checks/ differs from their gold answer: a measure of the checker."""
    gold = answers[answers["kind"] == "gold"].drop_duplicates("image_id").set_index("image_id")["true_labels"]
    checked = answers[answers["kind"] == "check"]
    both = checked[checked["image_id"].isin(gold.index)]
    return int((both["true_labels"].to_numpy() != gold.loc[both["image_id"]].to_numpy()).sum())
