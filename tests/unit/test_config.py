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


SFT_TINY = CONFIGS / "sft-tiny.yaml"


def test_dotted_overrides_reach_nested_sections_with_their_types():
    from rau_ray.train.sft import SFTConfig

    cfg = load_config(SFT_TINY, SFTConfig, dotted=["scale.num_workers=1", "lr=1e-3", "name=my run",
                                                   "model.policy.lora_rank=16", "scale.storage_path=null"])
    # storage_path is a str: "null" stays text there (a folder of that name); where None is allowed it means None
    assert cfg.scale.num_workers == 1 and isinstance(cfg.scale.num_workers, int)
    assert cfg.lr == 1e-3 and cfg.name == "my run" and cfg.scale.storage_path == "null"
    assert cfg.model.policy.lora_rank == 16  # the typed model section: the profile's, with this override
    assert cfg.model.policy.hidden_size == load_config(SFT_TINY, SFTConfig).model.policy.hidden_size
    with pytest.raises(ConfigError, match="PolicyConfig has no field 'lora_rnk'"):
        load_config(SFT_TINY, SFTConfig, dotted=["model.policy.lora_rnk=16"])
    assert load_config(SFT_TINY, SFTConfig).scale.num_workers == 2  # the file itself is untouched


@pytest.mark.parametrize("override, message", [
    ("scale.num_wokers=1", r"ScaleConfig has no field 'num_wokers'; valid fields: .*num_workers"),
    ("lr", r"'lr' is not KEY=VALUE"),
    ("=3", r"is not KEY=VALUE"),
    ("scale.num_workers=two", r"scale.num_workers: expected int, got 'two'"),
    ("lr.x=1", r"lr has no fields"),
])
def test_bad_dotted_overrides_are_named(override, message):
    from rau_ray.train.sft import SFTConfig

    with pytest.raises(ConfigError, match=message):
        load_config(SFT_TINY, SFTConfig, dotted=[override])


def test_text_values_take_their_field_types():
    from dataclasses import dataclass

    from rau_ray.config import text_fields

    @dataclass
    class Args:
        threads: int | None = 1
        bank_dir: str | None = "banks"
        wait_s: float = 0.01

    assert from_dict(Args, text_fields(Args, {"threads": "4", "bank_dir": "null", "wait_s": "1e-3"})) == Args(
        4, None, 1e-3)
    assert from_dict(Args, text_fields(Args, {"threads": "null", "bank_dir": "4"})) == Args(None, "4")
    with pytest.raises(ConfigError, match=r"threads: '4x' matches none of"):
        from_dict(Args, text_fields(Args, {"threads": "4x"}), "serve args")

    cfg = from_dict(MakeConfig, text_fields(MakeConfig, {"modality": "ct-abdomen", "n": "4", "out": "5",
                                                         "size": "96"}))
    assert (cfg.n, cfg.size, cfg.out) == (4, 96, "5")  # a str field keeps "5" as text
