from dataclasses import asdict, replace

import pytest

from ml.config import CONFIG_NAME, ConfigError, Settings, load_settings, write_settings


def _load(home, text: str) -> Settings:
    (home / CONFIG_NAME).write_text(text, encoding="utf-8")
    return load_settings(home)


def _error(home, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        _load(home, text)
    return str(caught.value)


def test_missing_settings_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="vendor-audit.yaml: settings file not found"):
        load_settings(tmp_path)


@pytest.mark.parametrize("text, reason", [
    ("classes: [cat]\n", "at least two"),
    ("classes: cat, dog\n", "must be a list"),
    ("classes: [cat, cat]\n", "duplicate"),
    ("classes: [cat, ' Cat ']\n", "duplicate names \\(ignoring letter case\\)"),
    ("classes: [cat, '  ']\n", "non-empty"),
    ("classes: [0, 1]\n", "quote names"),
    ("epochs: 3\n", "'classes' is required"),
    ("", "expected a mapping"),
    ("classes: [cat, dog]\nfolds: 1\n", "'folds'"),
    ("classes: [cat, dog]\nheads: [resnet]\n", "'heads'"),
    ("classes: [cat, dog\n", "not valid YAML"),
])
def test_invalid_settings_are_clear_errors(tmp_path, text, reason):
    (tmp_path / "vendor-audit.yaml").write_text(text)
    with pytest.raises(ConfigError, match=reason):
        load_settings(tmp_path)


def test_settings_round_trip(tmp_path):
    settings = Settings(classes=("cat", "dog"), epochs=3, heads=("l2softmax",))
    write_settings(tmp_path, settings)
    assert load_settings(tmp_path) == settings
    write_settings(tmp_path, Settings(classes=("cat", "dog")))
    assert load_settings(tmp_path).heads == "auto" and "heads: auto" in (tmp_path / "vendor-audit.yaml").read_text()
    full = Settings(classes=("T-shirt/top", "0", "yes"), image_size=512, channels=3, min_image_side=20,
                    max_aspect_ratio=2.5, quarantine_warn_share=0.0,
                    folds=2, epochs=1, batch_size=2, learning_rate=1.0, seed=2**32 - 1, heads=("l2softmax", "softmax"),
                    bootstrap=50, tracking_uri="sqlite:///x.db", dvc_remote="s3://bucket/audit")
    write_settings(tmp_path, full)
    assert load_settings(tmp_path) == full
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write leaves no temporary file


def test_defaults_and_spaces_around_class_names(tmp_path):
    settings = _load(tmp_path, "classes: [' cat', 'dog ']\n")
    assert settings.classes == ("cat", "dog") and settings.class_index() == {"cat": 0, "dog": 1}
    assert settings == Settings(classes=("cat", "dog")) and settings.heads == "auto"
    assert "extra" not in asdict(settings)


def test_a_typo_is_rejected_with_the_nearest_name(tmp_path):
    message = _error(tmp_path, "classes: [cat, dog]\nepoch: 8\n")
    assert message == f"{tmp_path / CONFIG_NAME}: unknown setting 'epoch': did you mean 'epochs'?"
    message = _error(tmp_path, "classes: [cat, dog]\ncolour: red\n")
    assert "unknown setting 'colour': the settings are classes, image_size, channels" in message


def test_a_comma_decimal_is_rejected_naming_file_field_and_value(tmp_path):
    message = _error(tmp_path, "classes: [cat, dog]\nlearning_rate: 0,002\n")
    assert message == (f"{tmp_path / CONFIG_NAME}: 'learning_rate' must be a number > 0 and <= 1 (got '0,002'): "
                       f"that is text, not a number; write 0.002 (a decimal point, not a comma)")


@pytest.mark.parametrize("text, value", [
    ("learning_rate: 1e-3", "'1e-3'"),  # YAML 1.1 reads an exponent without a dot as text
    ("epochs: '8'", "'8'"),
])
def test_numbers_written_as_text_are_rejected(tmp_path, text, value):
    message = _error(tmp_path, f"classes: [cat, dog]\n{text}\n")
    assert f"(got {value}): that is text, not a number" in message


@pytest.mark.parametrize("field", ["epochs", "folds", "batch_size", "seed", "bootstrap", "image_size", "channels",
                                   "min_image_side"])
def test_a_bool_is_not_an_int(tmp_path, field):
    message = _error(tmp_path, f"classes: [cat, dog]\n{field}: true\n")
    assert f"'{field}' must be " in message and "(got True)" in message


def test_several_errors_are_reported_together_one_line_each(tmp_path):
    message = _error(tmp_path, "classes: [cat, dog]\nepoch: 8\nfolds: 1\nlearning_rate: 0,002\nheads: []\n"
                               "tracking_uri: 5\n")
    lines = message.splitlines()
    assert len(lines) == 5
    assert all(line.startswith(f"{tmp_path / CONFIG_NAME}: ") for line in lines)
    for name in ("'epoch'", "'folds'", "'learning_rate'", "'heads'", "'tracking_uri'"):
        assert sum(name in line for line in lines) == 1, name


# (field, rejected values, accepted values): each range's edges
RANGES = [
    ("learning_rate", ["0", "-0.1", "1.01", ".nan", ".inf", "null"], ["1", "0.000001", "0.5"]),
    ("epochs", ["0", "-3", "2.0"], ["1", "40"]),
    ("folds", ["1", "0", "3.5"], ["2", "10"]),
    ("batch_size", ["1", "0"], ["2", "512"]),
    ("bootstrap", ["49", "0"], ["50", "1000"]),
    ("quarantine_warn_share", ["-0.01", "1.01", "'5%'"], ["0", "1", "0.2"]),
    ("seed", ["-1", str(2**32)], ["0", str(2**32 - 1)]),
    ("channels", ["2", "0", "4", "3.0"], ["1", "3", "null"]),
    ("image_size", ["7", "513", "32.0"], ["8", "512", "null"]),
    ("min_image_side", ["0", "-8", "8.0", "null", "automatic", "'8'"], ["1", "8", "1000", "auto"]),
    ("max_aspect_ratio", ["0.99", "0", "-4", ".inf", ".nan", "null", "'4'"], ["1", "4", "2.5", "100"]),
    ("heads", ["[]", "softmax", "[resnet]", "[softmax, softmax]", "[softmax, 1]"],
     ["[softmax]", "[l2softmax, softmax]", "auto"]),
    ("tracking_uri", ["5", "null", "[a]"], ["''", "http://127.0.0.1:5000"]),
    ("dvc_remote", ["5", "null"], ["''", "/srv/dvc"]),
    ("contract_max_error_rate", ["0", "1", "-0.1", "1.5", ".nan", "'0.05'", "true", "5%"],
     ["null", "0.05", "0.000001", "0.999"]),
    ("contract_overrides", ["null", "[a]", "0.05", "{a: 0}", "{a: 1}", "{a: .nan}", "{a: true}", "{a: '0.05'}",
                            "{a: null}", "{Acme Corp: 0.1}", "{1: 0.1}", "{'': 0.1}"],
     ["{}", "{a: 0.05}", "{acme-1_b: 0.5, B: 1.0e-3}"]),
]


@pytest.mark.parametrize("field, rejected, accepted", RANGES, ids=[r[0] for r in RANGES])
def test_each_range(tmp_path, field, rejected, accepted):
    for value in rejected:
        message = _error(tmp_path, f"classes: [cat, dog]\n{field}: {value}\n")
        assert message.startswith(f"{tmp_path / CONFIG_NAME}: '{field}' "), (value, message)
        assert len(message.splitlines()) == 1 and "(got " in message, (value, message)
    for value in accepted:
        _load(tmp_path, f"classes: [cat, dog]\n{field}: {value}\n")


def test_contract_settings_are_checked_strictly(tmp_path):
    """The contract's limits are fractions strictly between 0 and 1; an override names a vendor as its
    landing folder does, and each message says which vendor and what is wrong."""
    settings = _load(tmp_path, "classes: [cat, dog]\n")
    assert (settings.contract_max_error_rate, settings.contract_overrides) == (None, {})  # no contract
    file = tmp_path / CONFIG_NAME
    assert _error(tmp_path, "classes: [cat, dog]\ncontract_overrides: {acme: 5}\n") == (
        f"{file}: 'contract_overrides' gives vendor 'acme' the limit 5: a limit must be a number between 0 and 1 "
        f"(both excluded), e.g. 0.05 for 5% (got {{'acme': 5}})")
    assert _error(tmp_path, "classes: [cat, dog]\ncontract_overrides: {b: '0,05'}\n").endswith(
        "e.g. 0.05 for 5%: that is text, not a number; write 0.05 (a decimal point, not a comma) (got {'b': '0,05'})")
    assert "names vendor 'Acme Corp', which cannot be a vendor: name may only contain letters, digits, - and _" in \
        _error(tmp_path, "classes: [cat, dog]\ncontract_overrides: {Acme Corp: 0.1}\n")
    assert "names vendor 7, which YAML does not read as text: quote it, e.g. {'7': 0.05}" in \
        _error(tmp_path, "classes: [cat, dog]\ncontract_overrides: {7: 0.1}\n")
    assert f"{file}: 'contract_max_error_rate' must be null (no contract), or a number between 0 and 1 (exclusive), " \
           "e.g. 0.05 for 5% (got 5)" == _error(tmp_path, "classes: [cat, dog]\ncontract_max_error_rate: 5\n")
    # written with a comment per line, the mapping on one line, and read back the same
    chosen = Settings(classes=("cat", "dog"), contract_max_error_rate=0.1, contract_overrides={"acme": 0.05, "b-2": 0.2})
    write_settings(tmp_path, chosen)
    text = file.read_text()
    assert "\ncontract_max_error_rate: 0.1  # " in text and "\ncontract_overrides: {acme: 0.05, b-2: 0.2}  # " in text
    assert load_settings(tmp_path) == chosen
    write_settings(tmp_path, settings)
    assert "\ncontract_max_error_rate: null  # " in file.read_text() and "\ncontract_overrides: {}  # " in file.read_text()
    assert load_settings(tmp_path) == settings


def test_settings_built_in_code_are_validated_too():
    settings = Settings(classes=("cat", "dog"))
    with pytest.raises(ValueError):
        replace(settings, folds=1)
    with pytest.raises(ValueError):
        Settings(classes=("cat", "dog"), extra={})


def test_the_cli_stops_on_an_invalid_setting_before_any_work(tmp_path, capsys):
    from pipelines.cli import main

    home = tmp_path / "home"
    home.mkdir()
    (home / CONFIG_NAME).write_text("classes: [cat, dog]\nlearning_rate: 0,002\nepoch: 8\n")
    assert main(["run", "--home", str(home)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vendor-audit: error: {home / CONFIG_NAME}: unknown setting 'epoch'")
    assert f"{home / CONFIG_NAME}: 'learning_rate' must be a number" in err and "'0,002'" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in home.iterdir()) == [CONFIG_NAME]  # nothing started: no instance, no lock


def test_backbone_weights_and_training_default_to_auto(tmp_path):
    settings = _load(tmp_path, "classes: [cat, dog]\n")
    assert (settings.backbone, settings.weights, settings.training) == ("auto", "auto", "auto")
    chosen = _load(tmp_path, "classes: [cat, dog]\nbackbone: resnet50\nweights: IMAGENET1K_V2\ntraining: finetune\n")
    assert (chosen.backbone, chosen.weights, chosen.training) == ("resnet50", "IMAGENET1K_V2", "finetune")
    local = _load(tmp_path, "classes: [cat, dog]\nbackbone: resnet18\nweights: /models/resnet18-ours.pt\n")
    assert local.weights == "/models/resnet18-ours.pt"  # a path: checked when the weights are loaded


@pytest.mark.parametrize("text, reason", [
    ("backbone: resnet81\n", r"'backbone' is unknown: .*did you mean resnet18.*mobilenet_v2.*\(got 'resnet81'\)"),
    ("backbone: resnet18\nweights: IMAGENET9\n", r"'weights' does not suit backbone 'resnet18'.*DEFAULT, IMAGENET1K_V1"),
    ("backbone: efficientnet_lite0\nweights: IMAGENET1K_V2\n", r"'weights'.*packaged"),
    ("backbone: small_cnn\ntraining: probe\n", r"'training' probe needs a pretrained backbone"),
    ("training: fast\n", r"'training' must be probe, finetune or auto"),
    ("weights: ''\n", r"'weights' must be auto, none"),
])
def test_backbone_settings_errors_list_the_valid_names(tmp_path, text, reason):
    assert __import__("re").search(reason, _error(tmp_path, "classes: [cat, dog]\n" + text))


def test_image_limits_default_to_a_quarter_of_the_image_size_and_follow_the_settings(tmp_path):
    settings = _load(tmp_path, "classes: [cat, dog]\n")
    assert (settings.min_image_side, settings.max_aspect_ratio) == ("auto", 4.0)
    assert "\nmin_image_side: auto  # " in settings.to_yaml() and "\nmax_aspect_ratio: 4.0  # " in settings.to_yaml()
    # the size is inferred from the first delivery: 8 px until it is known, then a quarter of it
    assert [settings.image_limits(size).min_side for size in (None, 8, 28, 32, 36, 224)] == [8, 8, 8, 8, 9, 56]
    assert settings.image_limits(224).max_aspect_ratio == 4.0
    chosen = _load(tmp_path, "classes: [cat, dog]\nmin_image_side: 20\nmax_aspect_ratio: 2\n")
    assert (chosen.image_limits(None).min_side, chosen.image_limits(224).min_side) == (20, 20)
    assert chosen.image_limits(224).max_aspect_ratio == 2.0
    message = _error(tmp_path, "classes: [cat, dog]\nmin_image_side: 0\n")
    assert message == (f"{tmp_path / CONFIG_NAME}: 'min_image_side' must be auto (image_size / 4, at least 8 px) "
                       f"or an integer >= 1: images whose shorter side is smaller are quarantined (got 0)")
