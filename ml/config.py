"""The project settings file, ``<home>/vendor-audit.yaml``."""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, fields
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError, ValidationInfo, field_validator
from pydantic.dataclasses import dataclass

from ml.delivery import NAME_RE, NAME_RULE
from ml.engine import Engine
from ml.files import atomic_write_text
from ml.images import AUTO, DEFAULT_MAX_ASPECT_RATIO, MAX_UPSCALE, MIN_SIDE_FLOOR, ImageLimits, image_limits

CONFIG_NAME = "vendor-audit.yaml"
HEADS = ("softmax", "l2softmax")
TRAININGS = ("auto", "probe", "finetune")
# backbones and weights known without importing torch (the rest are checked against torchvision)
PLAIN_BACKBONES = ("auto", "small_cnn", "efficientnet_lite0")
SEED_MAX = 2**32 - 1  # a 32-bit seed suits every random generator used (torch, numpy)


class ConfigError(ValueError):
    """The settings file is missing or invalid."""


# Strict numbers: YAML's "0,002" or "1e-3" (a string in YAML 1.1) and `true` for an int are errors,
# not coerced; an int is accepted where a float is expected.
StrictInt = Annotated[int, Strict()]
StrictFloat = Annotated[float, Strict(), Field(allow_inf_nan=False)]
ErrorRateLimit = Annotated[StrictFloat, Field(gt=0, lt=1)]  # a contract's highest error rate, a fraction


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Settings:
    """Taxonomy and tuning knobs of one vendor-audit home, validated on construction.

    ``image_size`` and ``channels`` of ``None`` mean "inferred from the first delivery". Invalid
    values raise pydantic's ValidationError (a ValueError); ``load_settings`` turns it into a
    ConfigError naming the file, the field and the value.
    """

    classes: tuple[str, ...]
    image_size: Annotated[StrictInt, Field(ge=8, le=512)] | None = None
    channels: StrictInt | None = None
    min_image_side: Annotated[StrictInt, Field(ge=1)] | Literal["auto"] = AUTO  # auto: image_size / 4, >= 8 px
    max_aspect_ratio: Annotated[StrictFloat, Field(ge=1)] = DEFAULT_MAX_ASPECT_RATIO  # longer side / shorter side
    quarantine_warn_share: Annotated[StrictFloat, Field(ge=0, le=1)] = 0.05
    folds: Annotated[StrictInt, Field(ge=2)] = 5
    epochs: Annotated[StrictInt, Field(ge=1)] = 8
    batch_size: Annotated[StrictInt, Field(ge=2)] = 128
    learning_rate: Annotated[StrictFloat, Field(gt=0, le=1)] = 2e-3
    seed: Annotated[StrictInt, Field(ge=0, le=SEED_MAX)] = 0
    heads: tuple[str, ...] | str = "auto"  # a list of heads, or auto: by training mode (ml.train.resolve_heads)
    bootstrap: Annotated[StrictInt, Field(ge=50)] = 200  # intervals need enough bootstrap replicates
    tracking_uri: Annotated[str, Strict()] = ""  # MLflow tracking URI; empty: SQLite under <home>/mlflow
    dvc_remote: Annotated[str, Strict()] = ""    # DVC remote URL; empty: the folder <home>/dvc-remote
    backbone: Annotated[str, Strict()] = "auto"  # small_cnn, efficientnet_lite0, a torchvision model, or auto
    weights: Annotated[str, Strict()] = "auto"   # auto, none, a torchvision weights name, or a state dict's path
    training: Annotated[str, Strict()] = "auto"  # probe, finetune, or auto (finetune on a GPU, probe on a CPU)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"  # of training steps (ml.train.resolve_precision)
    contract_max_error_rate: ErrorRateLimit | None = None  # null: no contract (ml.contract)
    contract_overrides: dict[str, ErrorRateLimit] = Field(default_factory=dict)  # vendor -> its own limit
    worsening_window_days: Annotated[StrictInt, Field(ge=0)] | None = None  # null: the newest delivery alone
    label_studio_url: Annotated[str, Strict()] = ""  # the server checks pull answers from; empty: none
    label_studio_project: Annotated[StrictInt, Field(ge=1)] | None = None  # its project of hand checks
    cvat_url: Annotated[str, Strict()] = ""  # the CVAT server checks push creates tasks on; empty: none
    engine: Literal["local", "ray"] = "local"  # where images are decoded and features computed (ml.delivery, ml.features)
    ray_address: Annotated[str, Strict()] = ""  # engine ray: auto or ray://host:port; empty: a local Ray per run

    @field_validator("classes", mode="before")
    @classmethod
    def _check_classes(cls, value):
        if not isinstance(value, (list, tuple)) or len(value) < 2:
            raise ValueError(f"must be {RULES['classes']}")
        if not all(isinstance(name, str) for name in value):
            raise ValueError(f"must be {RULES['classes']}; quote names that YAML reads as numbers, dates or "
                             f"true/false, e.g. ['0', '1']")
        if not all(name.strip() for name in value):
            raise ValueError(f"must be {RULES['classes']}")
        names = tuple(name.strip() for name in value)
        # delivery labels match classes ignoring letter case, so 'Cat' and 'cat' would be one class
        folded = [name.casefold() for name in names]
        repeated = sorted({name for name in names if folded.count(name.casefold()) > 1})
        if repeated:
            raise ValueError(f"has duplicate names (ignoring letter case): {repeated}")
        return names

    @field_validator("heads", mode="before")
    @classmethod
    def _check_heads(cls, value):
        if value == "auto":
            return value
        if not isinstance(value, (list, tuple)) or not value or not all(isinstance(head, str) for head in value):
            raise ValueError(f"must be {RULES['heads']}")
        unknown = [head for head in value if head not in HEADS]
        if unknown:
            raise ValueError(f"names unknown heads {unknown}: must be among {', '.join(HEADS)}")
        if len(set(value)) != len(value):
            raise ValueError("names a head twice")
        return tuple(value)

    @field_validator("backbone")
    @classmethod
    def _check_backbone(cls, value):
        if value in PLAIN_BACKBONES:
            return value
        from ml.backbones import BackboneError, check_backbone_name

        try:
            return check_backbone_name(value)
        except BackboneError as exc:
            raise ValueError(f"is unknown: {exc}") from None

    @field_validator("weights")
    @classmethod
    def _check_weights(cls, value, info: ValidationInfo):
        if not value.strip():
            raise ValueError(f"must be {RULES['weights']}")
        backbone = info.data.get("backbone")
        if backbone is None or value in ("auto", "none"):
            return value
        from ml.backbones import BackboneError, check_weights

        try:
            return check_weights(backbone, value)
        except BackboneError as exc:
            raise ValueError(f"does not suit backbone {backbone!r}: {exc}") from None

    @field_validator("training")
    @classmethod
    def _check_training(cls, value, info: ValidationInfo):
        if value not in TRAININGS:
            raise ValueError(f"must be {RULES['training']}")
        if value == "probe" and info.data.get("backbone") == "small_cnn":
            raise ValueError("probe needs a pretrained backbone: small_cnn is trained from scratch (use training: auto, "
                             "or a pretrained backbone such as efficientnet_lite0)")
        return value

    @field_validator("contract_overrides", mode="before")
    @classmethod
    def _check_contract_overrides(cls, value):
        # checked here, not by the type, so that the message names the vendor and what is wrong with it
        if not isinstance(value, dict):
            raise ValueError(f"must be {RULES['contract_overrides']}")
        for vendor, limit in value.items():
            if not isinstance(vendor, str):
                raise ValueError(f"names vendor {vendor!r}, which YAML does not read as text: quote it, e.g. "
                                 f"{{'{vendor}': 0.05}}")
            if not NAME_RE.match(vendor):
                raise ValueError(f"names vendor {vendor!r}, which cannot be a vendor: {NAME_RULE}")
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit < 1:
                raise ValueError(f"gives vendor {vendor!r} the limit {limit!r}: a limit must be a number between 0 "
                                 f"and 1 (both excluded), e.g. 0.05 for 5%{_number_hint(limit)}")
        return value

    @field_validator("channels")
    @classmethod
    def _check_channels(cls, value):
        if value not in (None, 1, 3):
            raise ValueError(f"must be {RULES['channels']}")
        return value

    def image_limits(self, image_size: int | None) -> ImageLimits:
        """The size and shape a delivered image must have, for images stored at ``image_size`` (the
        configured or inferred size; None while it is not known, e.g. to infer it)."""
        return image_limits(image_size, self.min_image_side, self.max_aspect_ratio)

    def compute_engine(self) -> Engine:
        """Where images are decoded and features computed (the ``engine`` and ``ray_address`` settings)."""
        return Engine(self.engine, self.ray_address)

    def class_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def to_yaml(self) -> str:
        """The settings as YAML, one line per setting, each with a comment on what it accepts (the file
        documents itself: a user editing it needs no other page)."""
        data = asdict(self)
        data["classes"] = list(self.classes)
        data["heads"] = self.heads if self.heads == "auto" else list(self.heads)
        lines = [SETTINGS_HEADER]
        for name, value in data.items():
            # a one-element flow list, brackets removed: every value on one line, quoted where YAML needs it
            text = yaml.safe_dump([value], default_flow_style=True, width=float("inf")).strip()[1:-1]
            lines.append(f"{name}: {text}  # {HELP.get(name, RULES[name])}")
        return "\n".join(lines) + "\n"


# What each field accepts, in the words of the error messages.
RULES = {
    "classes": "a list of at least two unique, non-empty class names",
    "image_size": "an integer from 8 to 512, or null to infer it from the first delivery",
    "channels": "1 or 3, or null to infer it from the first delivery",
    "min_image_side": f"auto (image_size / {MAX_UPSCALE}, at least {MIN_SIDE_FLOOR} px) or an integer >= 1: "
                      f"images whose shorter side is smaller are quarantined",
    "max_aspect_ratio": "a number >= 1: images whose longer side exceeds it times the shorter are quarantined",
    "quarantine_warn_share": "a number from 0 to 1",
    "folds": "an integer >= 2",
    "epochs": "an integer >= 1",
    "batch_size": "an integer >= 2",
    "learning_rate": "a number > 0 and <= 1",
    "seed": f"an integer from 0 to {SEED_MAX}",
    "heads": f"auto, or a non-empty list of distinct heads among {', '.join(HEADS)}",
    "bootstrap": "an integer >= 50, the bootstrap replicates behind each interval",
    "tracking_uri": "a string; empty means the SQLite store under <home>/mlflow",
    "dvc_remote": "a string; empty means the folder <home>/dvc-remote",
    "backbone": "auto, small_cnn, efficientnet_lite0 or a torchvision classification model name (resnet50, ...)",
    "weights": "auto, none, a torchvision weights name (DEFAULT, IMAGENET1K_V2, ...) or the path of a state dict",
    "training": "probe, finetune or auto (finetune on a GPU, probe on a CPU)",
    "precision": "float32, bfloat16 or auto",
    "contract_max_error_rate": "null (no contract), or a number between 0 and 1 (exclusive), e.g. 0.05 for 5%",
    "contract_overrides": "a mapping of vendor names to numbers between 0 and 1 (exclusive), e.g. {acme: 0.05}; {} "
                          "for none",
    "worsening_window_days": "null (a vendor's newest delivery alone), or a whole number of days >= 0",
    "label_studio_url": "a string: the Label Studio server's address, e.g. http://127.0.0.1:8080; empty for none",
    "label_studio_project": "null, or the id (an integer >= 1) of the Label Studio project of hand checks",
    "cvat_url": "a string: the CVAT server's address, e.g. https://cvat.example.com; empty for none",
    "engine": "local or ray",
    "ray_address": "a string: auto, or ray://host:port; empty for a local Ray started for the run",
}
# What each setting means, for the comments of a written settings file (README: Settings).
HELP = {
    "classes": "required, in order: the class names delivery labels must use (matched ignoring case)",
    "image_size": "8 to 512 pixels a side; null: the first delivery's shorter side, at most 224",
    "channels": "1 or 3; null: inferred from the first delivery",
    "min_image_side": f"pixels: an image whose shorter side is smaller is quarantined; auto: image_size / "
                      f"{MAX_UPSCALE}, at least {MIN_SIDE_FLOOR}",
    "max_aspect_ratio": ">= 1: an image whose longer side is more than this times its shorter side is quarantined",
    "quarantine_warn_share": "0 to 1: the quarantined share of a delivery above which its check warns",
    "folds": ">= 2: cross-validation folds; each image is scored by a model that never trained on it",
    "epochs": ">= 1: training epochs per fold",
    "batch_size": ">= 2",
    "learning_rate": "> 0 and <= 1",
    "seed": f"0 to {SEED_MAX}: the same data and seed give the same scorecard",
    "heads": "softmax, l2softmax or both (a list, no repeats); auto: l2softmax for the small CNN, softmax on "
             "pretrained features",
    "bootstrap": ">= 50: bootstrap refits behind each interval",
    "tracking_uri": "MLflow tracking URI; empty: SQLite under the home's mlflow/",
    "dvc_remote": "DVC remote URL; empty: the folder dvc-remote/ in the home",
    "backbone": "small_cnn, efficientnet_lite0 or a torchvision classification model (resnet50, ...); auto: "
                "small_cnn for small grayscale images, efficientnet_lite0 for photos",
    "weights": "auto (the backbone's pretrained weights), none, a torchvision weights name (DEFAULT, ...) or the "
               "path of a state dict",
    "training": "probe (frozen features, a head per fold), finetune, or auto (finetune on a GPU, probe on a CPU)",
    "precision": "of the training steps: bfloat16 (autocast; about twice as fast on a CPU that has it), float32, or "
                 "auto (bfloat16 on a GPU or a CPU with native bfloat16, else float32)",
    "contract_max_error_rate": "0 to 1 (exclusive): the contract's highest error rate; a vendor's 95% interval above "
                               "it: drop, below it: pay, around it: warn; null: no contract",
    "contract_overrides": "{vendor: rate, ...}: a vendor's own limit, in place of contract_max_error_rate; {}: none",
    "worsening_window_days": "days: a vendor's deliveries ingested this many days before its newest are tested "
                             "together against its earlier ones for getting worse; null: the newest delivery alone",
    "label_studio_url": "Label Studio server that vendor-audit checks pull reads answers from (its token: the "
                        "environment variable LABEL_STUDIO_API_KEY, never this file); empty: none",
    "label_studio_project": "the id of its project of hand checks (in the project's URL); null: none",
    "cvat_url": "CVAT server that vendor-audit checks push creates tasks on and checks pull --from cvat reads "
                "(its token: the environment variable CVAT_ACCESS_TOKEN, never this file); empty: none",
    "engine": "where delivered images are decoded and pretrained-backbone features computed: local (this process) "
              "or ray (a Ray cluster, see ray_address)",
    "ray_address": "with engine ray: auto (the cluster this machine belongs to) or ray://host:port; empty: a local "
                   "Ray started for the run and stopped after it",
}
SETTINGS_HEADER = ("# vendor-audit settings, checked strictly before every run: an unknown name or a value of the "
                   "wrong type stops it\n# with a message naming the setting. The README's section Settings "
                   "describes each one.")
SETTING_NAMES = tuple(f.name for f in fields(Settings))
_SETTINGS_ADAPTER = TypeAdapter(Settings)


def load_settings(home: Path) -> Settings:
    """Read and validate ``home/vendor-audit.yaml``.

    Raises
    ------
    ConfigError
        The file is missing or not YAML, or has unknown or invalid settings: one line per problem,
        each naming the file, the setting and the value.
    """
    path = Path(home) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{path}: settings file not found (it needs at least 'classes:', the class names in order)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with at least 'classes:'")
    problems = [_unknown_setting(key) for key in raw if key not in SETTING_NAMES]
    known = {key: value for key, value in raw.items() if key in SETTING_NAMES}
    try:
        settings = _SETTINGS_ADAPTER.validate_python(known)
    except ValidationError as exc:
        problems += _field_problems(exc, known)
    if problems:  # all of them at once, one line each, so one edit fixes the file
        raise ConfigError("\n".join(f"{path}: {problem}" for problem in problems))
    return settings


def make_settings(source: str, **values) -> Settings:
    """Settings from ``values`` (the rest at their defaults), or a ConfigError whose lines name ``source``
    (the option or file the values came from), the setting and what it accepts."""
    try:
        return _SETTINGS_ADAPTER.validate_python(values)
    except ValidationError as exc:
        raise ConfigError("\n".join(f"{source}: {problem}" for problem in _field_problems(exc, values))) from None


def _unknown_setting(key) -> str:
    close = difflib.get_close_matches(str(key), SETTING_NAMES, n=1)
    if close:
        return f"unknown setting {key!r}: did you mean {close[0]!r}?"
    return f"unknown setting {key!r}: the settings are {', '.join(SETTING_NAMES)}"


def _field_problems(exc: ValidationError, values: dict) -> list[str]:
    """One line per invalid field (pydantic may report several errors for one field)."""
    problems, seen = [], set()
    for error in exc.errors():
        name = error["loc"][0] if error["loc"] else None
        if name in seen:
            continue
        seen.add(name)
        if error["type"] == "missing":
            problems.append(f"{name!r} is required: {RULES.get(name, 'a value')}")
            continue
        value = values.get(name)
        if error["type"] == "value_error":  # the validators' own words
            problems.append(f"{name!r} {error['ctx']['error']} (got {value!r})")
        else:
            problems.append(f"{name!r} must be {RULES.get(name, error['msg'])} (got {value!r}){_number_hint(value)}")
    return problems


def _number_hint(value) -> str:
    """For a number written as text ("0,002", "8", or "1e-3", which YAML 1.1 reads as a string)."""
    if not isinstance(value, str):
        return ""
    try:
        number = float(value.strip().replace(",", "."))
    except ValueError:
        return ""
    if not math.isfinite(number):
        return ""
    # positional digits: YAML 1.1 reads 1e-05 as text too
    written = str(int(number)) if number.is_integer() else format(Decimal(repr(number)), "f")
    comma = " (a decimal point, not a comma)" if "," in value else ""
    return f": that is text, not a number; write {written}{comma}"


def write_settings(home: Path, settings: Settings) -> Path:
    """Write ``settings`` to ``home/vendor-audit.yaml`` atomically; return the path."""
    path = Path(home) / CONFIG_NAME
    atomic_write_text(path, settings.to_yaml())
    return path
