"""Segmenter training pieces in one process (no Ray): items, both modes' losses falling on a fixed batch, weights."""

import numpy as np
import pytest
import torch

from rau_ray.config import from_dict
from rau_ray.data.manifest import read_manifest
from rau_ray.errors import ConfigError, DataError
from rau_ray.train.seg import build_seg_trainer
from rau_ray.train.seg_base import SegJobConfig, job_items, seg_items
from rau_ray.train.seg_cbam import PromptedSAM2


@pytest.fixture(scope="module")
def manifest(ct_manifest):
    return ct_manifest(n=5, size=64, slices=2)


def job(manifest, **fields) -> SegJobConfig:
    return from_dict(SegJobConfig, {"manifest": manifest, "batch_size": 4, "lr": 1e-2, **fields}, "test")


def test_bad_configs_are_clear_errors(manifest):
    with pytest.raises(ConfigError, match="mode must be one of rau, cbam-lora"):
        job(manifest, mode="unet")
    with pytest.raises(ConfigError, match="train_policy_lora applies to mode 'rau' only"):
        job(manifest, mode="cbam-lora", train_policy_lora=True)
    with pytest.raises(ConfigError, match="first_prompt"):
        job(manifest, first_prompt="scribble")
    with pytest.raises(ConfigError, match="focal_weight and dice_weight"):
        job(manifest, focal_weight=0.0, dice_weight=0.0)
    with pytest.raises(ConfigError, match="unknown field"):
        job(manifest, learning_rate=1.0)
    with pytest.raises(ConfigError, match="answers must be one of canonical, generated"):
        job(manifest, answers="sampled")
    with pytest.raises(ConfigError, match="answers: generated needs a frozen policy"):
        job(manifest, answers="generated", train_policy_lora=True)
    with pytest.raises(ConfigError, match="apply to mode 'rau' only"):
        job(manifest, mode="cbam-lora", policy_checkpoint="runs/train/grpo")
    with pytest.raises(ConfigError, match="memory-ref has no policy"):
        job(manifest, mode="memory-ref", policy_checkpoint="runs/train/grpo")


def _policy_checkpoint(folder, model: dict, config: dict | None = None):
    """An sft checkpoint folder whose adapter differs from the fresh one (as training leaves it)."""
    import json

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from rau_ray.models.policy import load_policy
    from rau_ray.models.profiles import model_config_from

    torch.manual_seed(5)
    policy = load_policy(model_config_from(model).policy)
    adapter = {k: (v + 0.02 * torch.randn_like(v)).contiguous()
               for k, v in get_peft_model_state_dict(policy.model).items()}
    folder.mkdir(parents=True)
    save_file(adapter, str(folder / "weights.safetensors"))
    (folder / "train_state.json").write_text(json.dumps({"step": 3, "config": config or {
        "manifest": "m.jsonl", "name": "sft", "model": model, "zero_stage": 2, "tasks": ["segment"], "seed": 0}}))
    return folder, adapter


def test_a_policy_checkpoint_feeds_the_segmenter_its_own_answers(manifest, tmp_path):
    from peft import get_peft_model_state_dict

    from rau_ray.models.checkpoint import read_checkpoint, weights_digest
    from rau_ray.models.profiles import model_config_from
    from rau_ray.train.seg_rau import with_policy_checkpoint

    model = {"profile": "tiny", "policy": {"lora_rank": 4}}
    folder, adapter = _policy_checkpoint(tmp_path / "sft", model)
    cfg = with_policy_checkpoint(job(manifest, policy_checkpoint=str(folder), answers="generated",
                                     model={"profile": "tiny"}))
    assert cfg.policy_sha256 == weights_digest(read_checkpoint(folder))
    assert cfg.model == model_config_from(model)  # its policy section from the checkpoint
    trainer = build_seg_trainer(cfg)
    loaded = get_peft_model_state_dict(trainer.policy.model)
    assert all(torch.equal(loaded[k], adapter[k]) for k in adapter)  # the policy it will serve with, frozen
    assert not any(p.requires_grad for p in trainer.policy.model.parameters())
    items = seg_items(manifest, "val", "rau")[:2]
    inputs = trainer._policy_inputs(items)
    completions = trainer.policy.tokenizer.batch_decode(inputs["input_ids"])
    assert all("<Seg>" in c for c in completions)  # a malformed generated answer falls back to the canonical one
    states, _ = trainer.seg_hidden(items)
    assert states.shape[:2] == (2, 1) and torch.isfinite(states).all()

    with pytest.raises(ConfigError, match="a seg checkpoint, not a policy"):
        seg_folder, _ = _policy_checkpoint(tmp_path / "segck", model, {"mode": "rau", "model": model})
        with_policy_checkpoint(job(manifest, policy_checkpoint=str(seg_folder)))
    with pytest.raises(ConfigError, match="a tiny-profile policy, this job's model is the paper profile"):
        with_policy_checkpoint(job(manifest, policy_checkpoint=str(folder), model={"profile": "paper"}))
    # a policy section other than the profile's and the checkpoint's is a contradiction (the profile's is the default)
    with pytest.raises(ConfigError, match="model.policy and policy_checkpoint .* disagree"):
        with_policy_checkpoint(job(manifest, policy_checkpoint=str(folder),
                                   model={"profile": "tiny", "policy": {"lora_rank": 2}}))


def test_items_pair_every_shared_structure(manifest):
    m = read_manifest(manifest)
    rows = {r.id: r for r in m.rows}
    rau = seg_items(m, "train", "rau")
    assert rau and {rows[it["target"]].split for it in rau} == {"train"}
    for it in rau:
        ref, tgt = rows[it["reference"]], rows[it["target"]]
        assert ref.split == "train" and ref.subject != tgt.subject
        for row in (ref, tgt):
            label = m.load(row)[1]
            value = {v: k for k, v in row.label_names.items()}[it["structure"]]
            assert (label == value).any()
    pairs = {(it["reference"], it["target"]) for it in rau}
    assert len(rau) > len(pairs)  # several structures per pair
    cbam = seg_items(manifest, "val", "cbam-lora")
    val_rows = [r for r in m.rows if r.split == "val"]
    expected = sum(len(set(np.unique(m.load(r)[1])) - {0}) for r in val_rows)
    assert len(cbam) == expected and all(it["reference"] is None for it in cbam)
    with pytest.raises(ConfigError, match="mode"):
        seg_items(m, "train", "unet")
    spine = job_items(job(manifest, mode="cbam-lora", structures=["vertebrae"]), m, "val", 0)
    assert spine and {it["structure"] for it in spine} == {"vertebrae"}
    assert len(spine) == len([it for it in cbam if it["structure"] == "vertebrae"])


@pytest.mark.parametrize("mode", ["rau", "cbam-lora", "memory-ref"])
def test_loss_falls_on_a_fixed_batch_and_weights_round_trip(manifest, mode):
    # the adapter starts as the identity on the pretrained SAM2 (already low loss): the job config's rate, not 1e-2
    cfg = job(manifest, mode=mode, interactive_rounds=1, **({"lr": 1e-3} if mode == "cbam-lora" else {}))
    trainer = build_seg_trainer(cfg)
    batch = seg_items(manifest, "train", mode)[:4]
    before = trainer.fixed_losses(batch)
    rng = np.random.default_rng(0)
    for _ in range(16):
        trainer.train_step(batch, rng)
    after = trainer.fixed_losses(batch)
    assert after["loss"] < 0.95 * before["loss"], (before, after)  # from the pretrained SAM2-tiny: 7-8 % in 16 steps
    assert after["dice"] < before["dice"]

    val = seg_items(manifest, "val", mode)
    scores = trainer.evaluate(val)
    assert scores["n"] == len(val) and 0 <= scores["dice"] <= scores["n"]

    weights = trainer.weights()
    if mode == "memory-ref":  # SAM2-Memory-Ref-SFT: no <Seg> query, only SAM2's decoder trains
        assert weights and all(k.startswith("sam.sam_mask_decoder.") for k in weights)
    trainable = [p for p in trainer.parameters()]
    assert len(weights) == len(trainable) and sum(v.numel() for v in weights.values()) == sum(
        p.numel() for p in trainable)
    torch.manual_seed(123)
    fresh = build_seg_trainer(cfg)
    assert fresh.fixed_losses(batch)["loss"] == pytest.approx(before["loss"], rel=1e-4)  # same seeded init
    fresh.load_weights(weights)
    assert fresh.fixed_losses(batch)["loss"] == pytest.approx(after["loss"], rel=1e-4)
    with pytest.raises(DataError, match="do not match this model"):
        fresh.load_weights({k: v for k, v in list(weights.items())[1:]})


def test_interactive_rounds_add_clicks_and_feed_the_previous_mask(manifest):
    cfg = job(manifest, mode="cbam-lora")
    trainer = build_seg_trainer(cfg)
    model: PromptedSAM2 = trainer.model
    items = seg_items(manifest, "train", "cbam-lora")[:3]
    images, masks, _ = trainer._tensors(items)
    calls = []
    hook = model.sam.sam_prompt_encoder.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append((kwargs["points"][1].clone(), kwargs["masks"])), with_kwargs=True)
    try:
        with torch.no_grad():
            outputs = model(images, masks, ["box", "point", "box"], rounds=2, points_per_round=2,
                            rng=np.random.default_rng(0))
    finally:
        hook.remove()
    s = model.sam.image_size
    assert len(outputs) == 3 and all(o.shape == (3, 1, s, s) for o in outputs)
    labels = [c[0] for c in calls]
    assert [tuple(lab.shape) for lab in labels] == [(3, 2), (3, 4), (3, 6)]  # 2 prompt slots, +2 clicks a round
    assert labels[0][0].tolist() == [2, 3] and labels[0][1].tolist() == [1, -1]  # box corners; one point + pad
    assert calls[0][1] is None and all(c[1] is not None for c in calls[1:])  # previous logits as the mask prompt
    assert set(labels[1][:, 2:].flatten().tolist()) <= {-1, 0, 1}


def test_a_structure_that_vanished_at_sam2_size_gets_no_prompt():
    # a small organ can disappear when a 192 px slice is resized to the tiny SAM2's 128 px: train on "nothing here"
    masks = np.zeros((2, 16, 16), bool)
    masks[1, 4:9, 6:12] = True
    coords, labels = PromptedSAM2.first_prompts(masks, ["box", "box"], np.random.default_rng(0))
    assert (labels[0] == -1).all()  # padding only: no prompt for the empty mask
    assert labels[1].tolist() == [2, 3] and coords[1].tolist() == [[6, 4], [12, 9]]  # mask_to_box: end-exclusive
