"""The project settings file, ``<home>/vendor-audit.yaml``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

CONFIG_NAME = "vendor-audit.yaml"


class ConfigError(ValueError):
    """The settings file is missing or invalid."""


@dataclass(frozen=True)
class Settings:
    """Taxonomy and tuning knobs of one vendor-audit home.

    ``image_size`` and ``channels`` of ``None`` mean "inferred from the first delivery".
    """

    classes: tuple[str, ...]
    image_size: int | None = None
    channels: int | None = None
    quarantine_warn_share: float = 0.05
    folds: int = 5
    epochs: int = 8
    batch_size: int = 128
    learning_rate: float = 2e-3
    seed: int = 0
    heads: tuple[str, ...] = ("softmax", "l2softmax")
    bootstrap: int = 200
    tracking_uri: str = ""  # MLflow tracking URI; empty: SQLite under <home>/mlflow
    dvc_remote: str = ""    # DVC remote URL; empty: the folder <home>/dvc-remote
    extra: dict = field(default_factory=dict)

    def class_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def to_yaml(self) -> str:
        data = asdict(self)
        data["classes"] = list(self.classes)
        data["heads"] = list(self.heads)
        data.pop("extra")
        return yaml.safe_dump(data, sort_keys=False)


def load_settings(home: Path) -> Settings:
    """Read and validate ``home/vendor-audit.yaml``; raise ConfigError naming the file and field."""
    path = Path(home) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{path}: settings file not found (it needs at least 'classes:', the class names in order)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with at least 'classes:'")
    classes = raw.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c.strip() for c in classes):
        raise ConfigError(f"{path}: 'classes' must be a list of at least two non-empty class names")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"{path}: 'classes' has duplicate names")
    known = {f.name for f in fields(Settings)} - {"extra"}
    values: dict = {"classes": tuple(c.strip() for c in classes)}
    extra = {}
    for key, value in raw.items():
        if key == "classes":
            continue
        if key not in known:
            extra[key] = value
            continue
        values[key] = tuple(value) if key == "heads" else value
    try:
        settings = Settings(**values, extra=extra)
    except TypeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    _validate(settings, path)
    return settings


def _validate(s: Settings, path: Path) -> None:
    def bad(field_name: str, why: str) -> ConfigError:
        return ConfigError(f"{path}: '{field_name}' {why}")

    if s.image_size is not None and not (isinstance(s.image_size, int) and 8 <= s.image_size <= 512):
        raise bad("image_size", "must be an integer from 8 to 512")
    if s.channels not in (None, 1, 3):
        raise bad("channels", "must be 1 or 3")
    if not (isinstance(s.folds, int) and s.folds >= 2):
        raise bad("folds", "must be an integer >= 2")
    if not (isinstance(s.epochs, int) and s.epochs >= 1):
        raise bad("epochs", "must be an integer >= 1")
    if not 0 <= float(s.quarantine_warn_share) <= 1:
        raise bad("quarantine_warn_share", "must be a fraction between 0 and 1")
    unknown_heads = set(s.heads) - {"softmax", "l2softmax"}
    if not s.heads or unknown_heads:
        raise bad("heads", f"must name heads among softmax, l2softmax (got {sorted(unknown_heads) or 'none'})")


def write_settings(home: Path, settings: Settings) -> Path:
    path = Path(home) / CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(settings.to_yaml(), encoding="utf-8")
    tmp.replace(path)
    return path
