"""Unit-test fixtures shared across packages: a training checkpoint folder written as the jobs write one, and a
tiny policy adapter with every tensor changed, as training would leave it. The unit tier starts no Ray cluster:
a unit test asking for ``ray_cluster`` (or a fixture built on it) is refused at collection; it belongs in
tests/integration."""

import json
from pathlib import Path

import pytest
import torch

RAY_FIXTURES = {"ray_cluster", "run_cli"}


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    starts_ray = [item.nodeid for item in items if here in Path(item.fspath).resolve().parents
                  and RAY_FIXTURES & set(getattr(item, "fixturenames", ()))]
    if starts_ray:
        raise pytest.UsageError("unit tests must not start Ray (move them to tests/integration): "
                                + ", ".join(starts_ray))


@pytest.fixture(autouse=True)
def no_ray_cluster(monkeypatch):
    """``ray.init`` refuses inside a unit test: code under test that would start a cluster fails loudly."""
    import ray

    def refuse(*args, **kwargs):
        raise RuntimeError("a unit test tried to start Ray (ray.init); it belongs in tests/integration")

    monkeypatch.setattr(ray, "init", refuse)


ADAPTER_MODEL = {"profile": "tiny", "policy": {"lora_rank": 4}}  # the model section of the tests' sft configs


def _write_checkpoint(folder, weights, config, step=5):
    from safetensors.torch import save_file

    from rau_ray.models import checkpoint as ck

    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / ck.WEIGHTS))
    (folder / ck.STATE).write_text(json.dumps({"step": step, "config": config}))
    (folder / ck.HISTORY).write_text(json.dumps({"step": step, "loss": 1.0, "val_accuracy": 0.5}) + "\n")
    return folder


@pytest.fixture
def write_checkpoint():
    """``write_checkpoint(folder, weights, config, step=5)`` -> folder: weights.safetensors, train_state.json and a
    one-row history.jsonl (loss 1.0, val_accuracy 0.5)."""
    return _write_checkpoint


@pytest.fixture(scope="session")
def trained_adapter():
    """The adapter of a tiny policy built from ADAPTER_MODEL, every tensor changed (seeded)."""
    from peft import get_peft_model_state_dict

    from rau_ray.models.policy import load_policy
    from rau_ray.models.profiles import model_config_from

    torch.manual_seed(1)
    policy = load_policy(model_config_from(ADAPTER_MODEL).policy)
    return {k: v + torch.randn_like(v) for k, v in get_peft_model_state_dict(policy.model).items()}
