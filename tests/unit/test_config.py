"""Typed YAML configs: a wrong field or value fails at load with a message naming it."""

from pathlib import Path

import pytest

from rau_ray.config import from_dict, load_config
from rau_ray.data.make import MakeConfig
from rau_ray.errors import ConfigError, DataError

CONFIGS = Path(__file__).resolve().parents[2] / "jobs" / "configs"


def test_shipped_configs_load():
    cfg = load_config(CONFIGS / "data-tiny.yaml", MakeConfig)
    assert cfg.modality == "ct-abdomen" and cfg.size == 192
    assert load_config(CONFIGS / "data-paper.yaml", MakeConfig).size == 512


def test_overrides_and_int_to_float():
    cfg = load_config(CONFIGS / "data-tiny.yaml", MakeConfig, {"out": "elsewhere"})
    assert cfg.out == "elsewhere"


@pytest.mark.parametrize("data, error, message", [
    ({"modality": "ct-abdomen", "n": 2, "out": "o", "sizee": 3}, ConfigError, "unknown field.*sizee.*valid fields"),
    ({"modality": "ct-abdomen", "n": "two", "out": "o"}, ConfigError, r"cfg.n: expected int, got 'two'"),
    ({"modality": "ct-abdomen", "n": True, "out": "o"}, ConfigError, r"cfg.n: expected int"),
    ({"modality": "ct-abdomen", "out": "o"}, ConfigError, "missing required field.*n"),
    ({"modality": "ct-abdomen", "n": 2, "out": "o", "dims": 4}, DataError, "--dims must be 2 or 3"),
    ({"modality": "mri", "n": 2, "out": "o"}, DataError, "unknown phantom modality 'mri'"),
    ([1, 2], ConfigError, "expected a mapping"),
])
def test_bad_fields_are_named(data, error, message):
    with pytest.raises(error, match=message):
        from_dict(MakeConfig, data, where="cfg")


def test_bad_yaml_and_missing_file(tmp_path):
    (tmp_path / "c.yaml").write_text("modality: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "c.yaml", MakeConfig)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml", MakeConfig)
