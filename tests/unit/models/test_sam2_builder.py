"""Tiny SAM2 through sam2's own builder; one image embedding serves many prompts."""

import numpy as np
import pytest
import torch

from rau_ray.errors import ConfigError
from rau_ray.models.sam2_builder import (TINY, Sam2Config, build_sam2_model, embed_image, predict_with_prompts,
                                         predictor_for)


@pytest.fixture(scope="module")
def model():
    return build_sam2_model(TINY)


def test_tiny_is_small_real_sam2_and_reloads_identically(model):
    n = sum(p.numel() for p in model.parameters())
    assert 500_000 < n < 5_000_000
    assert type(model).__name__ == "SAM2Base" and model.image_size == TINY.image_size
    again = build_sam2_model(TINY)  # from the cached checkpoint, through torch.load(weights_only=True)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


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
    for masks, scores, low_res in outs:
        assert masks.shape == (1, 90, 110) and scores.shape == (1,)
    assert not np.array_equal(outs[0][2], outs[2][2])  # different prompts, different logits


def test_image_size_must_fit_sam2():
    with pytest.raises(ConfigError, match="multiple of 16"):
        Sam2Config(image_size=100).validate()
