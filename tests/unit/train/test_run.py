"""TrainJobConfig: the one base of every training job's config (name, scale, steps, logging, checkpoints, seed).

Run: pytest tests/unit/train/test_run.py
"""

from dataclasses import FrozenInstanceError, fields
from pathlib import Path

import pytest

from rau_ray.config import load_config
from rau_ray.errors import ConfigError
from rau_ray.train.jobs import JOBS, job_types
from rau_ray.train.run import ScaleConfig, TrainJobConfig

CONFIGS = Path(__file__).resolve().parents[3] / "jobs" / "configs"
TINY = {"sft": "sft-tiny.yaml", "grpo": "grpo-tiny.yaml", "seg": "seg-tiny.yaml",
        "pretrain-sam2": "pretrain-sam2-tiny.yaml", "pretrain-dino": "pretrain-dino-tiny.yaml",
        "pretrain-policy": "pretrain-policy-tiny.yaml"}
BASE_FIELDS = [f.name for f in fields(TrainJobConfig)]


def test_every_job_of_the_registry_has_a_tiny_config_here():
    assert set(TINY) == set(JOBS)


@pytest.mark.parametrize("kind", sorted(TINY))
def test_every_job_config_is_a_train_job_config_with_the_shared_fields(kind):
    cls, _ = job_types(kind)
    assert issubclass(cls, TrainJobConfig)
    names = [f.name for f in fields(cls)]
    assert all(name in names for name in BASE_FIELDS)
    cfg = load_config(CONFIGS / TINY[kind], cls)
    assert isinstance(cfg.scale, ScaleConfig) and cfg.name and cfg.log_every >= 1
    with pytest.raises(FrozenInstanceError):
        cfg.seed = 1


@pytest.mark.parametrize("kind", sorted(TINY))
@pytest.mark.parametrize(("key", "value", "message"), [
    ("name", "a/b", "name must be a folder name"),
    ("name", "", "name must be a folder name"),
    ("name", "..", "name must be a folder name"),
    ("max_steps", -1, "max_steps"),
    ("log_every", 0, "log_every"),
    ("checkpoint_every", 0, "checkpoint_every"),
])
def test_the_shared_fields_are_checked_for_every_job(kind, key, value, message):
    cls, _ = job_types(kind)
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / TINY[kind], cls, {key: value})


@pytest.mark.parametrize("kind", sorted(TINY))
def test_the_scale_section_is_checked_for_every_job(kind):
    cls, _ = job_types(kind)
    with pytest.raises(ConfigError, match="scale.num_workers"):
        load_config(CONFIGS / TINY[kind], cls, dotted=["scale.num_workers=0"])


@pytest.mark.parametrize("kind", sorted(TINY))
def test_dotted_overrides_reach_the_shared_scale_section(kind):
    cls, _ = job_types(kind)
    cfg = load_config(CONFIGS / TINY[kind], cls, dotted=["scale.storage_path=/tmp/elsewhere", "seed=7"])
    assert cfg.scale.storage_path == "/tmp/elsewhere" and cfg.seed == 7


def test_job_configs_take_keywords_only():
    cls, _ = job_types("seg")
    with pytest.raises(TypeError):
        cls("manifest.jsonl")  # positional: a field order change could never silently swap two values
