"""The composed RAU model: predict from a bank or a given reference, the embedding cache, training losses."""

import pytest
import torch

from rau_ray.data.formats import apply_window
from rau_ray.data.make import MakeConfig, make_dataset
from rau_ray.data.phantoms import ct_abdomen
from rau_ray.errors import DataError
from rau_ray.models import prompts
from rau_ray.models.profiles import get_profile
from rau_ray.models.rau import RAUModel, Reference
from rau_ray.models.retrieval import ReferenceBank


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("rau")
    make_dataset(MakeConfig("ct-abdomen", n=6, out=str(root / "ct"), size=96), backend="local", progress=False)
    cfg = get_profile("tiny")
    ReferenceBank.build(root / "ct" / "manifest.jsonl", cfg.retrieval, backend="local", progress=False).save(
        root / "bank")
    torch.manual_seed(0)
    return RAUModel.build(cfg, bank_dir=str(root / "bank"))


@pytest.fixture(scope="module")
def target():
    return ct_abdomen.generate_2d(1, 50, size=96)[2]  # a subject the bank has never seen (seed 1)


def test_predict_with_retrieved_reference(model, target):
    p = model.predict(target.image, "liver", modality="CT")
    assert p.mask.shape == target.image.shape and p.mask.dtype == bool
    assert p.reference["id"].startswith("ct-abdomen-") and -1 <= p.reference["similarity"] <= 1
    assert 0 <= p.score <= 1 and isinstance(p.reasoning, str)
    assert p.label == "liver" and (p.format_error is None) == (p.reasoning.startswith("<think>"))
    assert p.attention.shape == (1, (model.cfg.sam2.image_size // 16) ** 2)
    assert set(p.timings) >= {"retrieval", "generate", "embed", "decode", "total"}
    if p.box is not None:
        x1, y1, x2, y2 = p.box
        assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96


def test_embedding_cache_skips_the_encoder(model, target):
    calls = []
    hook = model.segmenter.sam.image_encoder.register_forward_hook(lambda *_: calls.append(1))
    ref = ct_abdomen.generate_2d(1, 51, size=96)[2]
    try:
        model.predict(target.image, "aorta", reference=Reference(ref.image, ref.label, ref.labels))
        first = len(calls)
        model.predict(target.image, "vertebrae", reference=Reference(ref.image, ref.label, ref.labels))
    finally:
        hook.remove()
    assert first <= 2 and len(calls) == first  # second prompt on the same two images: no encoder call


def test_predict_many_asks_once_and_boxes_are_the_masks(model, target):
    """Several structures of one target: one batched generation, a prediction per structure in order, each box the
    tight box of its own mask (None where the mask is empty)."""
    ref = ct_abdomen.generate_2d(1, 51, size=96)[2]
    reference = Reference(ref.image, ref.label, ref.labels)
    calls = []
    generate = model.policy.generate
    model.policy.generate = lambda batch, **kw: calls.append(len(batch)) or generate(batch, **kw)
    try:
        many = model.predict_many(target.image, ["aorta", "vertebrae", "liver"], reference=reference)
    finally:
        model.policy.generate = generate
    assert calls == [3] and [p.structure for p in many] == ["aorta", "vertebrae", "liver"]
    for p in many:
        assert p.mask.shape == target.image.shape
        if p.mask.any():
            ys, xs = p.mask.nonzero()
            assert p.box == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        else:
            assert p.box is None  # an empty mask: the chain finds no such structure
    with pytest.raises(DataError, match="'appendix' is not annotated"):
        model.predict_many(target.image, ["aorta", "appendix"], reference=reference)


def test_unknown_structure_is_a_clear_error(model, target):
    ref = ct_abdomen.generate_2d(1, 51, size=96)[2]
    with pytest.raises(DataError, match="'appendix' is not annotated in the reference; it has aorta"):
        model.predict(target.image, "appendix", reference=Reference(ref.image, ref.label, ref.labels))


def test_forward_losses_and_gradients(model, target):
    ref = ct_abdomen.generate_2d(1, 51, size=96)[2]
    msgs = prompts.build_messages("segment", prompts.to_pil(ref.image), {"liver": [1, 2, 30, 40]},
                                  prompts.to_pil(target.image), structure="liver")
    batch = {"messages": [msgs, msgs],
             "completions": [prompts.build_answer("segment", label="liver", box=[1, 2, 30, 40])] * 2,
             "target_images": [apply_window(target.image, "abdomen")] * 2,
             "ref_images": [apply_window(ref.image, "abdomen")] * 2,
             "ref_masks": [ref.label == 1] * 2, "target_masks": [target.label == 1] * 2}
    losses = model.forward(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    assert 0 < float(losses["dice"]) <= 1
    model.policy.model.zero_grad()
    model.segmenter.zero_grad()
    losses["loss"].backward()
    lora = [p for n, p in model.policy.model.named_parameters() if "lora_A" in n]
    assert model.segmenter.projector[0].weight.grad.abs().sum() > 0  # the mask loss reaches the projector ...
    seg_row = [p for n, p in model.policy.model.named_parameters() if "trainable_tokens_delta" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in seg_row)  # ... and the <Seg> embedding
    assert all(p.grad is not None for p in lora)
