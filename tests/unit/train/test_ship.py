"""Shipped checkpoints (rau ship): byte-identical weights, shipped:<name> everywhere a checkpoint is taken, the
policy's adapter as a plain peft folder, a segmenter re-pointed at its shipped policy, and the errors."""

import json

import pytest
import torch
from peft import get_peft_model_state_dict

from rau_ray.errors import ConfigError, DataError
from rau_ray.models import checkpoint as ck
from rau_ray.models.pretrained import weights_root

SFT = {"manifest": "m.jsonl", "name": "sft", "model": {"profile": "tiny", "policy": {"lora_rank": 4}},
       "split": "train", "zero_stage": 2, "tasks": ["label"], "seed": 0}


@pytest.fixture
def weights(tmp_path, monkeypatch):
    """A weights root of its own: the shipped tiny backbones linked in, an empty rau/."""
    root = tmp_path / "weights"
    root.mkdir()
    for name in ("sam2", "dinov2", "qwen2_5_vl"):
        (root / name).symlink_to(weights_root() / name)
    monkeypatch.setenv("RAU_WEIGHTS", str(root))
    return root


def test_a_shipped_policy_loads_by_name_and_with_plain_peft(weights, tmp_path, trained_adapter, write_checkpoint):
    from peft import PeftModel
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from rau_ray.train.ship import ship

    write_checkpoint(tmp_path / "run" / "checkpoint_000000", trained_adapter, SFT, step=5)
    zeros = {k: v * 0 for k, v in trained_adapter.items()}
    write_checkpoint(tmp_path / "run" / "checkpoint_000001", zeros, SFT, step=10)
    out = ship(str(tmp_path / "run"), "sft", step=5)  # not the latest: the step asked for
    folder = weights / "rau" / "sft"
    assert out["shipped"] == "shipped:sft" and out["step"] == 5 and out["kind"] == "sft"
    assert (folder / ck.WEIGHTS).read_bytes() == (tmp_path / "run" / "checkpoint_000000" / ck.WEIGHTS).read_bytes()
    assert json.loads((folder / "training.json").read_text())["last_metrics"]["val_accuracy"] == 0.5
    shipped = ck.read_checkpoint("shipped:sft")
    assert shipped.path == folder.resolve() and shipped.kind == "sft" and shipped.step == 5
    loaded = get_peft_model_state_dict(ck.load_policy_checkpoint(shipped).model)
    assert all(torch.equal(loaded[k], trained_adapter[k]) for k in trained_adapter)
    # the same adapter through plain transformers + peft: the tiny base, its tokenizer with <Seg>, the adapter
    processor = AutoProcessor.from_pretrained(folder / "processor")
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(weights / "qwen2_5_vl")
    base.resize_token_embeddings(len(processor.tokenizer))
    plain = get_peft_model_state_dict(PeftModel.from_pretrained(base, folder / "adapter"))
    assert set(plain) == set(trained_adapter)
    assert all(torch.equal(plain[k], trained_adapter[k]) for k in plain)
    with pytest.raises(ConfigError, match="no checkpoint at step 7"):
        ship(str(tmp_path / "run"), "sft", step=7)


def test_a_segmenter_ships_pointing_at_its_shipped_policy_and_not_without_it(weights, tmp_path, trained_adapter,
                                                                            write_checkpoint):
    from rau_ray.train.ship import ship

    policy = write_checkpoint(tmp_path / "grpo", trained_adapter, SFT)
    digest = ck.weights_digest(ck.read_checkpoint(policy))
    seg = {"manifest": "m.jsonl", "name": "seg", "mode": "rau", "model": {"profile": "tiny"}, "seed": 0,
           "policy_checkpoint": str(policy), "policy_sha256": digest}
    write_checkpoint(tmp_path / "seg", {"projector.weight": torch.ones(2, 2)}, seg)
    with pytest.raises(ConfigError, match=f"weights sha256 {digest}, which is not shipped"):
        ship(str(tmp_path / "seg"), "seg")
    ship(str(policy), "grpo")
    ship(str(tmp_path / "seg"), "seg")
    shipped = ck.read_checkpoint("shipped:seg")
    assert shipped.config["policy_checkpoint"] == "shipped:grpo" and shipped.config["policy_sha256"] == digest
    ck.check_pair(ck.read_checkpoint("shipped:grpo"), shipped)  # the shipped pair belongs together
    with pytest.raises(DataError, match=r"shipped:nope: no shipped checkpoint of that name .*shipped: grpo, seg"):
        ck.read_checkpoint("shipped:nope")
    with pytest.raises(ConfigError, match="plain folder name"):
        ship(str(policy), "../elsewhere")
