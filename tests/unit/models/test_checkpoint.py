"""The one checkpoint loader: kinds, run folders, exact (strict) loading of policy and segmenter weights, errors."""

from dataclasses import asdict

import pytest
import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file

from rau_ray.errors import ConfigError, DataError
from rau_ray.models import checkpoint as ck
from rau_ray.models.fusion import RAUSegmenter
from rau_ray.models.profiles import get_profile
from rau_ray.models.rau import RAUModel
from rau_ray.models.sam2_builder import build_sam2_model

SFT = {"manifest": "m.jsonl", "name": "sft", "model": {"profile": "tiny", "policy": {"lora_rank": 4}},
       "split": "train", "zero_stage": 2, "tasks": ["label"], "seed": 0}
SEG = {"manifest": "m.jsonl", "name": "seg", "mode": "rau", "model": {"profile": "tiny"}, "train_split": "train",
       "seed": 0}


def test_policy_round_trip_is_exact(tmp_path, trained_adapter, write_checkpoint):
    write_checkpoint(tmp_path / "run" / "checkpoint_a", trained_adapter, SFT, step=5)
    write_checkpoint(tmp_path / "run" / "checkpoint_b", trained_adapter, SFT, step=9)
    c = ck.read_checkpoint(tmp_path / "run")  # a run folder: its latest checkpoint
    assert c.kind == "sft" and c.step == 9 and c.path.name == "checkpoint_b" and c.history()[0]["loss"] == 1.0
    policy = ck.load_policy_checkpoint(c)
    loaded = get_peft_model_state_dict(policy.model)
    assert set(loaded) == set(trained_adapter)
    assert all(torch.equal(loaded[k], trained_adapter[k]) for k in loaded)
    assert not policy.model.training
    assert c.describe()["train_split"] == "train" and c.describe()["step"] == 9


def test_strict_names_and_shapes(tmp_path, trained_adapter, write_checkpoint):
    name = sorted(trained_adapter)[0]
    missing = {k: v for k, v in trained_adapter.items() if k != name}
    with pytest.raises(DataError, match=r"1 missing \(e\.g\. '"):
        ck.load_policy_checkpoint(ck.read_checkpoint(write_checkpoint(tmp_path / "a", missing, SFT)))
    extra = {**trained_adapter, "stray.weight": torch.zeros(2)}
    with pytest.raises(DataError, match="1 unexpected"):
        ck.load_policy_checkpoint(ck.read_checkpoint(write_checkpoint(tmp_path / "b", extra, SFT)))
    other_rank = {**SFT, "model": {"profile": "tiny", "policy": {"lora_rank": 2}}}
    with pytest.raises(ConfigError, match="has shape"):
        ck.load_policy_checkpoint(ck.read_checkpoint(write_checkpoint(tmp_path / "c", trained_adapter, other_rank)))


def test_kinds_and_not_a_checkpoint(tmp_path, trained_adapter, write_checkpoint):
    assert ck.checkpoint_kind({"num_generations": 4}) == "grpo"
    assert ck.checkpoint_kind({"mode": "cbam-lora"}) == "cbam" and ck.checkpoint_kind(SEG) == "seg"
    assert ck.checkpoint_kind({"mode": "memory-ref"}) == "memref"
    with pytest.raises(DataError, match="cannot tell which training job"):
        ck.checkpoint_kind({"lr": 1})
    with pytest.raises(DataError, match="not a training checkpoint"):
        ck.read_checkpoint(tmp_path)
    with pytest.raises(DataError, match="no such checkpoint folder"):
        ck.read_checkpoint(tmp_path / "nope")
    folder = write_checkpoint(tmp_path / "s", trained_adapter, SFT)
    with pytest.raises(ConfigError, match="a sft checkpoint, not a seg one"):
        ck.read_checkpoint(folder, kind="seg")
    (folder / ck.STATE).write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        ck.read_checkpoint(folder)
    folder = write_checkpoint(tmp_path / "u", trained_adapter, SFT)
    uri = ck.read_checkpoint(folder.as_uri())  # file:// like s3:// / gs://
    assert uri.kind == "sft" and set(uri.weights) == set(trained_adapter)


def test_segmenter_and_rau_model_from_checkpoints(tmp_path, trained_adapter, write_checkpoint):
    cfg = get_profile("tiny")
    torch.manual_seed(3)
    seg = RAUSegmenter(build_sam2_model(cfg.sam2), cfg.fusion)
    weights = {k: v + 0.5 for k, v in seg.trainable_state_dict().items()}
    sft_model = {"profile": "tiny", "policy": {"lora_rank": 4}}
    sft_dir = write_checkpoint(tmp_path / "sft", trained_adapter, {**SFT, "model": sft_model})
    digest = ck.weights_digest(ck.read_checkpoint(sft_dir))
    seg_dir = write_checkpoint(tmp_path / "seg", weights, {**SEG, "model": sft_model,
                                                           "policy_checkpoint": str(sft_dir), "policy_sha256": digest})
    loaded = ck.load_segmenter_checkpoint(ck.read_checkpoint(seg_dir))
    assert all(torch.equal(loaded.trainable_state_dict()[k], weights[k]) for k in weights)
    model = RAUModel.from_checkpoint(policy=str(sft_dir), segmenter=str(seg_dir))
    assert model.cfg.policy.lora_rank == 4 and [c["kind"] for c in model.checkpoints] == ["sft", "seg"]
    policy_weights = get_peft_model_state_dict(model.policy.model)
    assert all(torch.equal(policy_weights[k], trained_adapter[k]) for k in trained_adapter)
    alone = RAUModel.from_checkpoint(segmenter=str(seg_dir))  # the policy it recorded
    assert all(torch.equal(get_peft_model_state_dict(alone.policy.model)[k], trained_adapter[k])
               for k in trained_adapter)
    with pytest.raises(ConfigError, match="not a policy"):
        RAUModel.from_checkpoint(policy=ck.read_checkpoint(seg_dir))
    with pytest.raises(ConfigError, match="not a cbam-lora"):
        ck.load_cbam_checkpoint(ck.read_checkpoint(seg_dir))
    assert asdict(ck.combined_config(None, None, "tiny")) == asdict(cfg)


def test_a_segmenter_refuses_a_policy_it_was_not_trained_on(tmp_path, trained_adapter, write_checkpoint):
    sft_model = {"profile": "tiny", "policy": {"lora_rank": 4}}
    own = write_checkpoint(tmp_path / "own", trained_adapter, {**SFT, "model": sft_model})
    other = write_checkpoint(tmp_path / "other", {k: v * 2 for k, v in trained_adapter.items()},
                             {**SFT, "model": sft_model})
    digest = ck.weights_digest(ck.read_checkpoint(own))
    assert digest != ck.weights_digest(ck.read_checkpoint(other)) and len(digest) == 16
    seg_weights = {"projector.0.weight": torch.zeros(1)}  # check_pair reads configs and digests only
    seg = ck.read_checkpoint(write_checkpoint(tmp_path / "seg", seg_weights, {**SEG, "model": sft_model,
                                                                              "policy_checkpoint": str(own),
                                                                              "policy_sha256": digest}))
    ck.check_pair(ck.read_checkpoint(own), seg)  # its own policy, from any copy of the folder
    with pytest.raises(ConfigError, match=rf"seg was trained on .*{own}.*{digest}.*not on the sft policy "
                                          rf".*other \(weights sha256"):
        ck.check_pair(ck.read_checkpoint(other), seg)
    base_seg = ck.read_checkpoint(write_checkpoint(tmp_path / "base-seg", seg_weights, SEG))  # on the base policy
    with pytest.raises(ConfigError, match="the profile's base policy"):
        ck.combined_config(ck.read_checkpoint(own), base_seg)
    joint = ck.read_checkpoint(write_checkpoint(tmp_path / "joint", {**seg_weights, "policy.x": torch.zeros(1)},
                                                SEG))
    with pytest.raises(ConfigError, match="its own policy adapter"):
        ck.check_pair(ck.read_checkpoint(own), joint)
    ck.check_pair(None, base_seg)  # alone: it brings its own policy
    # the recorded policy changed after the segmenter trained: loading the segmenter alone says so
    save_file({k: (v * 3).contiguous() for k, v in trained_adapter.items()}, str(own / ck.WEIGHTS))
    with pytest.raises(ConfigError, match="has changed since the segmenter was trained"):
        ck.load_policy_checkpoint(ck.read_checkpoint(tmp_path / "seg"))
    import shutil

    shutil.rmtree(own)
    with pytest.raises(DataError, match="the policy checkpoint its segmenter was trained with cannot be read"):
        ck.load_policy_checkpoint(ck.read_checkpoint(tmp_path / "seg"))
