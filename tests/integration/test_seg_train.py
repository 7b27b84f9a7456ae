"""Segmenter training on a real local Ray cluster, 2 CPU workers (DDP on gloo): both modes report validation Dice,
checkpoint their trainable weights, load back, and a second run of the same name resumes where the first ended."""

from __future__ import annotations

import pytest
import torch

from rau_ray.config import from_dict
from rau_ray.errors import ConfigError
from rau_ray.models.checkpoint import read_history, read_weights_and_state
from rau_ray.train.seg import run_seg, seg_trainer_from_checkpoint
from rau_ray.train.seg_base import SegJobConfig


@pytest.fixture(scope="module")
def manifest(ct_manifest):
    return ct_manifest(n=5, size=64, slices=2)


def seg_config(manifest, tmp_path, **fields) -> SegJobConfig:
    base = dict(manifest=manifest, batch_size=2, lr=0.01, log_every=1, eval_every=2, checkpoint_every=2,
                eval_items=6, scale={"num_workers": 2, "storage_path": str(tmp_path / "runs")})
    return from_dict(SegJobConfig, {**base, **fields}, "test")


def _val_rows(history):
    return [row for row in history if "val_dice" in row]


def test_rau_mode_reports_val_dice_checkpoints_loads_and_resumes(ray_cluster, manifest, tmp_path):
    one = {"num_workers": 1, "storage_path": str(tmp_path / "runs")}  # two workers: the cbam-lora test below
    result = run_seg(seg_config(manifest, tmp_path, name="rau", mode="rau", max_steps=4, scale=one))
    assert result.error is None
    history = read_history(result.checkpoint.path)
    assert [row["step"] for row in history] == [0, 1, 2, 3, 4]  # step 0: the untrained validation
    val = _val_rows(history)
    assert [row["step"] for row in val] == [0, 2, 4]
    assert all(0 <= row["val_dice"] <= 1 and row["val_dice_start"] == val[0]["val_dice"] for row in val)
    assert all(row["loss"] > 0 and 0 <= row["dice"] <= 1 for row in history[1:])
    assert result.metrics["step"] == 4 and "val_dice" in result.metrics

    weights, state = read_weights_and_state(result.checkpoint.path)
    assert state["step"] == 4 and state["config"]["mode"] == "rau"
    assert any(k.startswith("projector.") for k in weights) and any(k.startswith("sam.sam_mask_decoder.")
                                                                     for k in weights)
    assert not any(k.startswith("sam.image_encoder.") for k in weights)  # the image encoder stays frozen
    trainer = seg_trainer_from_checkpoint(result.checkpoint.path)
    loaded = trainer.segmenter.trainable_state_dict()
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)

    resumed = run_seg(seg_config(manifest, tmp_path, name="rau", mode="rau", max_steps=6, scale=one))  # same name
    assert resumed.error is None
    history = read_history(resumed.checkpoint.path)
    assert [row["step"] for row in history] == [0, 1, 2, 3, 4, 5, 6]  # continued, not restarted
    assert [row["resumed_from"] for row in history[-2:]] == [4, 4]
    assert read_weights_and_state(resumed.checkpoint.path)[1]["step"] == 6


def test_cbam_lora_mode_trains_interactively_on_two_workers(ray_cluster, manifest, tmp_path):
    result = run_seg(seg_config(manifest, tmp_path, name="cbam", mode="cbam-lora", max_steps=2,
                                interactive_rounds=1, first_prompt="mixed"))
    assert result.error is None
    m = result.metrics
    assert m["step"] == 2 and 0 <= m["val_dice"] <= 1 and 0 <= m["val_dice_interactive"] <= 1
    assert 0 <= m["dice_last_round"] <= 1 and m["loss"] > 0
    weights, state = read_weights_and_state(result.checkpoint.path)
    assert state["config"]["mode"] == "cbam-lora"
    assert any("lora_A" in k for k in weights) and any(".cbam." in k for k in weights)
    assert any(k.startswith("sam_mask_decoder.") for k in weights)  # train_mask_decoder (the default)
    trainer = seg_trainer_from_checkpoint(result.checkpoint.path)
    assert all(torch.equal(v, weights[k]) for k, v in trainer.weights().items())


def test_bad_inputs_are_clear_errors(manifest, tmp_path):
    with pytest.raises(ConfigError, match="no validation items in split 'nonexistent'"):
        run_seg(seg_config(manifest, tmp_path, val_split="nonexistent"))
    with pytest.raises(ConfigError, match="cannot feed 64 workers"):
        run_seg(seg_config(manifest, tmp_path, scale={"num_workers": 64}))
