"""GRPO on a real local Ray cluster, 2 CPU workers with DeepSpeed: rewards logged, checkpoints load, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from rau_ray.config import from_dict
from rau_ray.data.make import MakeConfig, make_dataset
from rau_ray.models.checkpoint import locate_checkpoint, read_history, read_weights_and_state
from rau_ray.models.policy import load_policy
from rau_ray.models.profiles import model_config_from
from rau_ray.train.grpo import GRPOJobConfig, adapter_state, load_adapter, run_grpo

# the SFT recipe of jobs/configs/sft-tiny.yaml: LoRA on the attention and the MLPs
MODEL = {"profile": "tiny", "policy": {"lora_rank": 32, "lora_alpha": 64, "lora_targets": [
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo_data") / "ct"
    make_dataset(MakeConfig(modality="ct-abdomen", n=6, out=str(out), size=96, slices_per_subject=1),
                 backend="local", progress=False)
    return str(out / "manifest.jsonl")


@pytest.fixture(scope="module")
def sft_checkpoint() -> Path:
    """The SFT start: the shipped SFT checkpoint (``shipped:sft``, jobs/configs/sft-tiny.yaml's long run; the SFT job
    has its own tests). Sampled at temperature 1 its answers are in format and the groups' rewards differ, so GRPO
    has advantages to learn from (a group whose rewards are all equal has none: GRPO rightly leaves the adapter)."""
    return Path(locate_checkpoint("shipped:sft"))


def grpo_config(manifest, sft_checkpoint, tmp_path, **fields) -> GRPOJobConfig:
    base = dict(manifest=manifest, sft_checkpoint=str(sft_checkpoint), tasks=["label"], num_generations=4,
                batch_size=4, temperature=1.0, max_completion_length=100, max_steps=2, log_every=1,
                checkpoint_every=2, scale={"num_workers": 2, "storage_path": str(tmp_path / "runs"),
                                           "max_failures": 0})
    return from_dict(GRPOJobConfig, {**base, **fields}, "test")


def test_grpo_logs_rewards_saves_loadable_checkpoints_and_resumes(ray_cluster, manifest, sft_checkpoint, tmp_path):
    cfg = grpo_config(manifest, sft_checkpoint, tmp_path, report_to=["tensorboard"])
    result = run_grpo(cfg)
    assert result.error is None
    metrics = result.metrics
    assert metrics["step"] == 2
    for key in ("rewards/format/mean", "rewards/format/std", "rewards/accuracy/mean", "rewards/accuracy/std",
                "reward", "kl", "completions/mean_length", "completions/clipped_ratio", "clip_ratio/region_mean",
                "clip_ratio/low_mean", "clip_ratio/high_mean", "entropy", "loss"):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert 0 < metrics["completions/mean_length"] <= 100
    history = read_history(result.checkpoint.path)
    assert [row["step"] for row in history] == [1, 2]
    # the SFT start answers in format: the rewards are really computed on the workers' rollouts
    assert max(row["rewards/format/mean"] for row in history) > 0
    assert max(row["reward_std"] for row in history) > 0  # some group had an advantage to learn from

    weights, state = read_weights_and_state(result.checkpoint.path)
    assert state["step"] == 2
    assert model_config_from(state["config"]["model"]) == model_config_from(MODEL)  # the model the adapter fits
    sft_weights, _ = read_weights_and_state(sft_checkpoint)
    assert set(weights) == set(sft_weights) and any("trainable_tokens" in k for k in weights)  # + the <Seg> rows
    assert any(not torch.equal(weights[k], sft_weights[k]) for k in weights)  # GRPO moved the adapter
    fresh = load_policy(model_config_from(MODEL).policy)
    load_adapter(fresh.model, weights)
    loaded = adapter_state(fresh.model)
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)

    events = list(Path(cfg.scale.storage_path, cfg.name, "tensorboard").glob("events.out.tfevents.*"))
    assert events and any(b"rewards/format/mean" in e.read_bytes() for e in events)

    resumed = run_grpo(grpo_config(manifest, sft_checkpoint, tmp_path, max_steps=3))  # same name: resumes
    assert resumed.error is None and resumed.metrics["step"] == 3
    assert [row["step"] for row in read_history(resumed.checkpoint.path)] == [1, 2, 3]
    assert read_weights_and_state(resumed.checkpoint.path)[1]["step"] == 3
