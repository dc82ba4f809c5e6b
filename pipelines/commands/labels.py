"""``vendor-audit labels export``: the corrected dataset, and each vendor's flagged images to relabel."""

from __future__ import annotations

from pipelines.audit_run import audit_lock


def register(add) -> None:
    actions = add("labels", "the labels out: the curated dataset with one decision per image", group=True)
    p = add("export", "write corrected/labels.csv and labels.parquet (one decision per image: kept, corrected by a "
                      "hand check, model suggestion, ambiguous), versioned with DVC, and per vendor its flagged images "
                      "as a relabelling task set for Label Studio and CVAT (exports/relabel-VERSION/); the scorecard "
                      "is not changed", under=actions)
    p.add_argument("--threshold", type=float, default=0.5, metavar="P",
                   help="unchecked images whose p_error is at least P get the model's suggestion as their label")
    p.add_argument("--no-relabel", action="store_true", help="write the labels only, no relabelling task sets")
    p.set_defaults(handler=export_labels, needs_home=True)


def export_labels(args) -> int:
    import pandas as pd

    from ml.config import load_settings
    from ml.corrections import DECISIONS, corrected_labels
    from ml.files import atomic_write_bytes, atomic_write_csv
    from ml.report import load_issue_images
    from pipelines.resources import AuditHome, DvcRepo

    home = args.home
    classes = load_settings(home).classes
    issues_path = home / "reports" / "label_issues.csv"
    with audit_lock(home):  # label issues and curated images as one audit left them
        if not issues_path.is_file():
            raise FileNotFoundError(f"{issues_path} does not exist: run the audit first (vendor-audit run)")
        issues = pd.read_csv(issues_path, dtype={"image_id": str, "given_label": str, "suggested_label": str,
                                                 "checked_labels": str, "check_source": str},
                             keep_default_na=False)
        labels = corrected_labels(issues, args.threshold)
        folder = home / "corrected"
        atomic_write_csv(folder / "labels.csv", labels)
        atomic_write_bytes(folder / "labels.parquet", labels.to_parquet(index=False))
        dvc = DvcRepo(audit_home=AuditHome(home=str(home)))
        version = dvc.snapshot("corrected")
        counts = labels["decision"].value_counts()
        summary = ", ".join(f"{int(counts.get(d, 0))} {d.replace('_', ' ')}" for d in DECISIONS)
        dvc.record_snapshot("corrected", f"corrected labels {version}: {summary}")
        print(f"{len(labels)} images: {summary}\nlabels: {folder / 'labels.csv'}\n        {folder / 'labels.parquet'}\n"
              f"version {version} (DVC; the scorecard is unchanged)")
        if not args.no_relabel:
            _relabel_sets(home, labels, classes, version, load_issue_images)
    return 0


def _relabel_sets(home, labels, classes, version: str, load_issue_images) -> None:
    """Per vendor with flagged images: a Label Studio and a CVAT task set with the vendor's label pre-filled."""
    from ml import labelstudio
    from ml.corrections import to_relabel
    from ml.tool_export import cvat_export, finish, label_studio_export

    root = (home / "exports").resolve()
    for vendor in sorted(labels["vendor"].unique()):
        flagged = to_relabel(labels, vendor)
        base = root / f"relabel-{version[:12]}" / vendor
        if flagged.empty or base.exists():  # nothing to fix, or this version's sets are written already
            continue
        images = load_issue_images(home / "curated", flagged)
        ids, given = flagged["image_id"].tolist(), flagged["given_label"].tolist()
        what = f"Relabelling for vendor {vendor}: the images whose label the audit found wrong"
        back = "Correct the label where it is wrong; return the tool's export to the buyer.\n"
        finish(label_studio_export(base / "label-studio", root, classes, ids, images,
                                   lambda urls: labelstudio.relabel_tasks(ids, urls, given, flagged["label"].tolist(),
                                                                          flagged["p_error"].tolist(), vendor), what),
               back)
        finish(cvat_export(base / "cvat", classes, ids, images, [[label] for label in given], what), back)
        print(f"{vendor}: {len(flagged)} flagged images to relabel: {base}")
