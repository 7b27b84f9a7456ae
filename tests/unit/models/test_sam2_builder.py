"""Tiny SAM2 through sam2's own builder and the model cache; one image embedding serves many prompts."""

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from rau_ray.errors import ConfigError
from rau_ray.models import pretrained
from rau_ray.models.sam2_builder import (
    PAPER,
    TINY,
    Sam2Config,
    build_sam2_model,
    checkpoint_path,
    embed_image,
    predict_with_prompts,
    predictor_for,
)

RANDOM = replace(TINY, init="random")


@pytest.fixture(scope="module")
def model():
    return build_sam2_model(RANDOM)


def test_random_tiny_builds_offline_into_the_cache_and_reloads_identically(model):
    assert os.environ["RAU_CACHE"] == str(pretrained.cache_root())  # the tests' own folder (conftest)
    ckpt = Path(checkpoint_path(RANDOM))
    assert ckpt.parent.parent == pretrained.cache_root() and (ckpt.parent / ".complete").exists()
    assert set(torch.load(ckpt, map_location="cpu", weights_only=True)) == {"model"}  # SAM2's release layout
    written = ckpt.stat().st_mtime_ns

    n = sum(p.numel() for p in model.parameters())
    assert 500_000 < n < 5_000_000
    assert type(model).__name__ == "SAM2Base" and model.image_size == TINY.image_size
    again = build_sam2_model(RANDOM)  # from the cached checkpoint, through sam2's torch.load(weights_only=True)
    assert ckpt.stat().st_mtime_ns == written  # reused, not rebuilt
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_embedding_once_many_prompts(model):
    calls = []
    hook = model.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        predictor = predictor_for(model)
        image = (np.random.default_rng(0).random((90, 110)) * 255).astype(np.uint8)
        emb = embed_image(predictor, image)
        outs = [predict_with_prompts(predictor, emb, points=np.array([[30, 40]]), labels=np.array([1])),
                predict_with_prompts(predictor, emb, points=np.array([[30, 40], [60, 50]]), labels=np.array([1, 0])),
                predict_with_prompts(predictor, emb, box=np.array([10, 10, 80, 70]))]
    finally:
        hook.remove()
    assert len(calls) == 1
    assert emb.orig_hw == (90, 110) and emb.features["image_embed"].shape[-2:] == (TINY.image_size // 16,) * 2
    for masks, scores, _low_res in outs:
        assert masks.shape == (1, 90, 110) and scores.shape == (1,)
    assert not np.array_equal(outs[0][2], outs[2][2])  # different prompts, different logits


def test_embed_image_takes_a_model_or_rgb(model):
    rgb = np.zeros((40, 50, 3), dtype=np.uint8)
    assert embed_image(model, rgb).orig_hw == (40, 50)
    with pytest.raises(ValueError, match="uint8"):
        embed_image(model, np.zeros((40, 50), dtype=np.float32))


def test_config_errors_and_paper_overrides(tmp_path):
    with pytest.raises(ConfigError, match="multiple of 16"):
        Sam2Config(image_size=100).validate()
    with pytest.raises(ConfigError, match="not a file"):
        build_sam2_model(replace(PAPER, checkpoint=str(tmp_path / "missing.pt"), device="cpu"))
    assert "++model.memory_attention.layer.cross_attention.feat_sizes=[64,64]" in PAPER.hydra_overrides()
    feat = TINY.image_size // 16
    assert f"++model.memory_attention.layer.self_attention.feat_sizes=[{feat},{feat}]" in TINY.hydra_overrides()


def test_the_shipped_tiny_sam2_is_the_default_and_segments_held_out_ct():
    """The pretrained weights (weights/tiny/sam2) on subjects of the benchmark seed, through SAM2ImagePredictor and
    the video predictor; bounds a little under benchmarks/backbones.py's figures (few subjects here)."""
    from rau_ray.train.pretrain_sam2 import quality

    assert TINY.init == "pretrained" and checkpoint_path(TINY).endswith("weights/tiny/sam2/model.safetensors")
    q = quality(subjects=2, memory_pairs=6, boot=10, ood_subjects=0)
    # random init: box Dice ~0.2, memory 0.0; benchmarks/backbones.py (12 subjects): 0.79 / 0.89 / 0.79 / 0.78
    assert q["ct_box"]["mean"] >= 0.72 and q["vertebrae_box"]["mean"] >= 0.82, q
    assert q["ct_3_clicks"]["mean"] >= 0.72 and q["memory_ref"]["mean"] >= 0.6, q
