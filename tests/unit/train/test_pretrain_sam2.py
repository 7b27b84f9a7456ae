"""SAM2-tiny pretraining: config guards, the losses fall, the export loads through the builder, bad files fail."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from rau_ray.data.manifest import assign_splits
from rau_ray.data.phantoms.common import subject_id
from rau_ray.errors import ConfigError, DataError
from rau_ray.models.sam2_builder import TINY, build_sam2_model
from rau_ray.train.pretrain import BENCHMARK_SEED, PretrainData, phantom_train_subjects
from rau_ray.train.pretrain_sam2 import Sam2PretrainConfig, Sampler, build, export_sam2, step_batch

SMALL = Sam2PretrainConfig(data=PretrainData(scenes=50, phantom_subjects=5, size=64), sam2={"image_size": 64},
                           mix=(0.0, 0.0, 1.0), batch_size=4, clip_batch=2, rounds=1, lr=3e-3, warmup_steps=0)


def test_config_refuses_out_of_distribution_data_and_the_benchmark_seed():
    with pytest.raises(ConfigError, match="ultrasound"):
        replace(SMALL, data=replace(SMALL.data, phantoms=("ultrasound",))).validate()
    with pytest.raises(ConfigError, match="benchmark"):
        replace(SMALL, data=replace(SMALL.data, seed=BENCHMARK_SEED)).validate()
    with pytest.raises(ConfigError, match="xray-angio"):
        replace(SMALL, mix=(0.5, 0.2, 0.3)).validate()
    with pytest.raises(ConfigError, match="checkpoint"):
        replace(SMALL, sam2={"checkpoint": "some.pt"}).validate()


def test_only_train_split_subjects_are_used():
    data = PretrainData(phantom_subjects=30)
    split = assign_splits([subject_id(i) for i in range(30)], seed=data.seed)
    used = phantom_train_subjects(data)["ct-abdomen"]
    assert used and all(split[subject_id(i)] == "train" for i in used)
    assert len(used) == sum(v == "train" for v in split.values())


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    SMALL.validate()
    torch.manual_seed(0)
    model = build(SMALL)
    sampler = Sampler(SMALL, 64)
    images, masks, clips = step_batch(SMALL, sampler, np.random.default_rng(0), 64)
    opt = torch.optim.AdamW(model.parameters(), lr=SMALL.lr)
    losses = []
    for _ in range(12):
        out = model(images, masks, clips, np.random.default_rng(1))  # the same clicks every step
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"]))
    assert {"img_mask", "img_multi", "img_heads", "mem_mask", "mem_score"} <= set(out)
    assert losses[-1] < 0.7 * losses[0]


def test_export_loads_as_the_pretrained_tiny_sam2_and_bad_files_fail(tmp_path, monkeypatch):
    monkeypatch.setenv("RAU_WEIGHTS", str(tmp_path))  # where init: pretrained looks (weights/tiny of a checkout)
    cfg = replace(SMALL, out=str(tmp_path / "sam2"))
    sam = build_sam2_model(replace(cfg.sam2_config(), seed=3))
    weights = {k: v.clone() for k, v in sam.state_dict().items()}
    out = export_sam2(cfg, weights, {"note": "test"})
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "rau_tiny_spec.json", "training.json"}
    shipped = replace(TINY, image_size=64, init="pretrained")
    loaded = build_sam2_model(shipped)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights.items())

    with pytest.raises(ConfigError, match="another architecture.*image_size"):  # weights of 64 px, asked 128
        build_sam2_model(replace(shipped, image_size=128))
    good = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(good[:1000])
    with pytest.raises(DataError, match="model.safetensors: not a readable"):
        build_sam2_model(shipped)
    other = build_sam2_model(replace(cfg.sam2_config(), hidden_dim=32))
    from safetensors.torch import save_file
    save_file(other.state_dict(), str(out / "model.safetensors"))
    with pytest.raises(DataError, match="model.safetensors: does not fit"):
        build_sam2_model(shipped)
