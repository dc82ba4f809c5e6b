import pytest

from ml.config import ConfigError, Settings, load_settings, write_settings


def test_missing_settings_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="vendor-audit.yaml: settings file not found"):
        load_settings(tmp_path)


@pytest.mark.parametrize("text, reason", [
    ("classes: [cat]\n", "at least two"),
    ("classes: cat, dog\n", "must be a list"),
    ("classes: [cat, cat]\n", "duplicate"),
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
