"""``vendor-audit checks export | push | pull``: hand checks in the tools checkers work in (Label Studio, CVAT)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from pipelines.audit_run import audit_lock


def register(add) -> None:
    actions = add("checks", "hand checks in Label Studio or CVAT: export the current plan's images, pull the answers",
                  group=True)
    p = add("export", "write the current check plan's images as a task set Label Studio or CVAT imports as it is "
                      "(exports/<tool>/checks-plan-NNN/, with a README.txt on how); the vendor's label is not shown",
            under=actions)
    p.add_argument("--to", choices=["label-studio", "cvat"], required=True,
                   help="the tool the checkers work in (no default: required)")
    p.add_argument("--suggestions", action="store_true",
                   help="pre-select the model's suggested class in each task (off by default: a suggestion sways "
                        "the checker towards the model)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="the export's folder (default: <home>/exports/<tool>/checks-plan-NNN)")
    p.add_argument("--document-root", type=Path, default=None, metavar="DIR",
                   help="label-studio only: the folder Label Studio serves local files from "
                        "(LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT), a parent of the export (default: <home>/exports)")
    p.set_defaults(handler=export_checks, needs_home=True)
    p = add("push", "create a task of the current check plan on the settings' CVAT server (cvat_url; token: "
                    "$CVAT_ACCESS_TOKEN) from its CVAT export (written first where missing); the task is recorded "
                    "in the export's cvat-task.json, and pushing again does not create another", under=actions)
    p.add_argument("--to", choices=["cvat"], required=True, help="the server's tool")
    p.add_argument("--suggestions", action="store_true",
                   help="pre-fill the model's suggested class as a tag (off by default: it sways the checker)")
    p.set_defaults(handler=push_checks, needs_home=True)
    p = add("pull", "download the answers from the tool's server into checks/: Label Studio (label_studio_url, "
                    "label_studio_project; token: $LABEL_STUDIO_API_KEY) -> checks/label-studio-project-N.json; "
                    "CVAT (cvat_url; token: $CVAT_ACCESS_TOKEN) -> checks/cvat-task-N.xml for every task checks "
                    "push created, or --task; the next run re-scores with them", under=actions)
    p.add_argument("--from", dest="tool", choices=["label-studio", "cvat"], default="label-studio",
                   help="the tool (default: label-studio)")
    p.add_argument("--task", type=int, action="append", default=None, metavar="ID",
                   help="cvat only: a task id to pull (repeatable; default: the tasks checks push created)")
    p.set_defaults(handler=pull_checks, needs_home=True)


def _current_plan(home: Path) -> tuple[pd.DataFrame, int]:
    """The images of reports/check_plan.csv (drawn, not answered yet) with their batch, and the newest
    plan's number."""
    from ml.check_plan import CheckPlanError

    path = home / "reports" / "check_plan.csv"
    if not path.is_file():
        raise CheckPlanError(f"{path} does not exist: draw a plan first (vendor-audit plan --budget N)")
    to_check = pd.read_csv(path, dtype={"image_id": str, "vendor": str}, keep_default_na=False)
    if to_check.empty:
        raise CheckPlanError(f"{path} lists no image to check: every planned image is answered "
                             f"(vendor-audit plan draws more)")
    issues = pd.read_csv(home / "reports" / "label_issues.csv", dtype=str, keep_default_na=False)
    batches = issues.set_index("image_id")[["batch", "suggested_label"]]
    unknown = to_check.loc[~to_check["image_id"].isin(batches.index), "image_id"]
    if len(unknown):
        raise CheckPlanError(f"{path}: image {unknown.iloc[0]} is not in label_issues.csv (re-run the audit, then "
                             f"plan again)")
    return to_check.join(batches, on="image_id"), int(to_check["plan"].max())


def _plan_images(home: Path) -> tuple[pd.DataFrame, int, dict]:
    from ml.report import load_issue_images

    with audit_lock(home):  # the plan, the issues and the curated images read as one state
        to_check, plan = _current_plan(home)
        images = load_issue_images(home / "curated", to_check)
    return to_check, plan, images


def _cvat_export(folder: Path, classes, to_check: pd.DataFrame, images: dict, suggestions: bool, what: str,
                 checks: Path):
    from ml.tool_export import cvat_export, finish

    prefilled = [[label] for label in to_check["suggested_label"]] if suggestions else None
    export = cvat_export(folder, classes, to_check["image_id"].tolist(), images, prefilled, what)
    return finish(export, "Check: put one tag per class the image shows (several where it truly shows several).\n"
                          f"Answers back: vendor-audit checks pull --from cvat (a task made by checks push), or "
                          f"Export task dataset > CVAT for images 1.1 and drop its annotations.xml into {checks}/ "
                          f"under a name of its own ending in .xml. Then vendor-audit run re-scores.\n")


def export_checks(args) -> int:
    from ml import labelstudio
    from ml.config import load_settings
    from ml.tool_export import finish, label_studio_export

    home = args.home
    classes = load_settings(home).classes
    to_check, plan, images = _plan_images(home)
    image_ids = to_check["image_id"].tolist()
    suggestions = to_check["suggested_label"].tolist() if args.suggestions else None
    folder = (args.out or home / "exports" / args.to / f"checks-plan-{plan:03d}").resolve()
    what = f"Hand checks of plan {plan} (reports/check_plan.csv)"
    if args.to == "label-studio":
        root = (args.document_root or home / "exports").resolve()
        export = label_studio_export(folder, root, classes, image_ids, images,
                                     lambda urls: labelstudio.check_tasks(image_ids, urls, plan, suggestions), what)
        export = finish(export, "5. Check: tick every class the image shows (several where it truly shows several).\n"
                                f"6. Answers back: Export > JSON, and drop the file into {home / 'checks'}/ (any "
                                f"name ending in .json), or set label_studio_url and label_studio_project in the "
                                f"settings and run vendor-audit checks pull. Then vendor-audit run re-scores.\n")
    else:
        export = _cvat_export(folder, classes, to_check, images, args.suggestions, what, home / "checks")
    print(f"{len(image_ids)} planned images (plan {plan}) exported for {args.to}: {export.folder}\n")
    print(export.instructions)
    return 0


def _cvat_server(home: Path, settings):
    from ml.cvat_api import TOKEN_VARIABLE, CvatServer

    if not settings.cvat_url:
        raise ValueError(f"{home / 'vendor-audit.yaml'}: set cvat_url to reach a CVAT server")
    return CvatServer(settings.cvat_url, os.environ.get(TOKEN_VARIABLE, ""))


def push_checks(args) -> int:
    from ml.config import load_settings
    from ml.cvat_api import push_task

    home = args.home
    settings = load_settings(home)
    server = _cvat_server(home, settings)
    to_check, plan, images = _plan_images(home)
    folder = (home / "exports" / "cvat" / f"checks-plan-{plan:03d}").resolve()
    if not (folder / "images.zip").is_file():
        _cvat_export(folder, settings.classes, to_check, images, args.suggestions,
                     f"Hand checks of plan {plan} (reports/check_plan.csv)", home / "checks")
    pushed = push_task(server, server.url, folder, plan)
    print(f"plan {plan}: {len(to_check)} images in CVAT task {pushed.task_id}: {server.url}/tasks/{pushed.task_id}"
          f"\n(recorded in {folder / 'cvat-task.json'}); vendor-audit checks pull --from cvat brings the answers "
          f"back.")
    return 0


def _pull_cvat(args, settings) -> int:
    from ml.cvat_api import pull_task, pushed_tasks

    home = args.home
    server = _cvat_server(home, settings)
    task_ids = args.task or [pushed.task_id for pushed in pushed_tasks(home / "exports", server.url)]
    if not task_ids:
        raise ValueError(f"no CVAT task to pull: checks push --to cvat records the tasks it creates on {server.url} "
                         f"(none under {home / 'exports' / 'cvat'}); name one with --task ID")
    for task_id in task_ids:
        print(f"task {task_id} from {server.url}: {pull_task(server, task_id, home / 'checks')}")
    print("vendor-audit run re-scores the audit with them.")
    return 0


def pull_checks(args) -> int:
    from ml.config import load_settings
    from ml.files import atomic_write_text
    from ml.labelstudio_api import TOKEN_VARIABLE, LabelStudio

    home = args.home
    settings = load_settings(home)
    if args.tool == "cvat":
        return _pull_cvat(args, settings)
    if args.task:
        raise ValueError("--task names CVAT tasks: use it with --from cvat")
    if not settings.label_studio_url or settings.label_studio_project is None:
        raise ValueError(f"{home / 'vendor-audit.yaml'}: set label_studio_url and label_studio_project to pull "
                         f"answers from Label Studio")
    server = LabelStudio(settings.label_studio_url, os.environ.get(TOKEN_VARIABLE, ""))
    tasks = server.export(settings.label_studio_project)
    names = server.user_names()
    for task in tasks:  # the checker's name travels in the file: it is read again without the server
        for annotation in task.get("annotations") or []:
            who = annotation.get("completed_by")
            if isinstance(who, int) and who in names:
                annotation["completed_by"] = {"id": who, "email": names[who]}
    path = home / "checks" / f"label-studio-project-{settings.label_studio_project}.json"
    atomic_write_text(path, json.dumps(tasks, indent=1) + "\n")
    answers = sum(len(task.get("annotations") or []) for task in tasks)
    print(f"{answers} answers on {len(tasks)} tasks from {settings.label_studio_url} project "
          f"{settings.label_studio_project}: {path}\nvendor-audit run re-scores the audit with them.")
    return 0
