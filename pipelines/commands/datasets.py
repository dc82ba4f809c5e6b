"""``vendor-audit datasets``: the dataset versions recorded in the home's git, with their models and scorecards."""

from __future__ import annotations

from pathlib import Path


def register(add) -> None:
    p = add("datasets", "list the dataset versions recorded in the home's git: deliveries, images, models, scorecards")
    p.set_defaults(handler=datasets, needs_home=True)


def datasets(args) -> int:
    from pipelines.resources import AuditHome, DvcRepo

    versions = dataset_versions(args.home)
    if not versions:
        print(f"no dataset version recorded in {args.home} yet: vendor-audit run --home {args.home} makes the first")
        return 0
    current = DvcRepo(audit_home=AuditHome(home=str(args.home))).checked_out_version() or versions[-1]["dataset_version"]
    for number, version in enumerate(versions, start=1):
        marker = "  <- in curated/ now" if version["dataset_version"] == current else ""
        print(f"{number}. dataset {version['dataset_version']}  commit {version['commit'][:8]}  "
              f"{version['date'][:16].replace('T', ' ')}  {version['n_images']} images, "
              f"{len(version['deliveries'])} deliveries{marker}")
        print("   deliveries: " + ", ".join(f"{key} ({n})" + (" new" if key in version["added"] else "")
                                          for key, n in version["deliveries"].items()))
        models = [f"v{m['model_version']} {m['head']}" + (" (champion)" if m["champion"] else "")
                  for m in version["models"]]
        print("   models trained on it: " + (", ".join(models) or "none"))
        cards = [f"{c['commit'][:8]} ({c['subject'].split(': ', 1)[1]})" for c in version["scorecards"]]
        print("   scorecards: " + (", ".join(cards) or "none"))
    print(f"\nrestore one: vendor-audit checkout --home {args.home} --dataset-version VERSION (a prefix is enough); "
          f"show a scorecard: git -C {args.home} show COMMIT:reports/scorecard.csv")
    return 0


def dataset_versions(home: Path) -> list[dict]:
    """Every dataset version recorded in the home's git, oldest first: ``dataset_version``, ``commit``,
    ``date``, ``n_images``, ``deliveries`` ({vendor/batch: images}), ``added`` (deliveries new in this
    version), ``models`` (registered versions trained on it: model_version, head, champion) and
    ``scorecards`` (audit commits of it: commit, date, subject)."""
    from pipelines.resources import AuditHome, DvcRepo, MlflowTracking

    audit_home = AuditHome(home=str(home))
    dvc = DvcRepo(audit_home=audit_home)
    history = dvc.history()
    models = _registered_models(MlflowTracking(audit_home=audit_home)) if (home / "mlflow").is_dir() else []
    versions, before = [], {}
    for entry in history:
        if entry["kind"] != "dataset":
            continue
        manifest = dvc.manifest(entry["commit"]) or {}
        deliveries = manifest.get("deliveries", {})
        version = entry["dataset_version"]
        versions.append({
            "dataset_version": version, "commit": entry["commit"], "date": entry["date"],
            "n_images": manifest.get("n_images", sum(deliveries.values())), "deliveries": deliveries,
            "added": [key for key in deliveries if key not in before],
            "models": [m for m in models if m["dataset_version"] == version],
            "scorecards": [e for e in history if e["kind"] == "audit" and e["dataset_version"] == version],
        })
        before = deliveries
    return versions


def _registered_models(tracking) -> list[dict]:
    """The registered versions of the classifier: model_version, dataset_version, head, champion."""
    mlflow = tracking.start()
    client = mlflow.MlflowClient()
    champion = tracking.champion()
    found = []
    for version in client.search_model_versions(f"name='{tracking.registered_model}'"):
        found.append({"model_version": str(version.version), "dataset_version": version.tags.get("dataset_version", ""),
                      "head": version.tags.get("head", ""),
                      "champion": champion is not None and champion["model_version"] == str(version.version)})
    return sorted(found, key=lambda m: int(m["model_version"]))
