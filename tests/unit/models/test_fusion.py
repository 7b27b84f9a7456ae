"""RAU's <Seg> -> projector -> memory attention -> SAM2 mask decoder, and SAM2's own memory (baseline, 3D)."""

import tempfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rau_ray.data.formats import apply_window
from rau_ray.data.phantoms import ct_abdomen
from rau_ray.models.fusion import PROJECTOR_DIMS, FusionConfig, RAUSegmenter, memory_ref_baseline, propagate_volume
from rau_ray.models.sam2_builder import TINY, build_sam2_model, build_video_predictor


@pytest.fixture(scope="module")
def images():
    s = ct_abdomen.generate_2d(0, 0, size=96)
    return apply_window(s[2].image, "abdomen"), s[2].label == 1, apply_window(s[3].image, "abdomen")


@pytest.fixture(scope="module")
def segmenter():
    torch.manual_seed(0)
    return RAUSegmenter(build_sam2_model(TINY), FusionConfig(llm_hidden_size=64))


def test_predict_shapes_and_memory_slots(segmenter, images):
    ref, ref_mask, tgt = images
    memory = segmenter.encode_reference(segmenter.set_image(ref), ref_mask)
    slots = (TINY.image_size // 16) ** 2
    assert memory.slots.shape == memory.pos.shape == (1, slots, TINY.mem_dim)
    logits, score, attn = segmenter.predict(segmenter.set_image(tgt), torch.randn(1, 64), memory)
    assert logits.shape == (96, 96) and 0.0 <= score <= 1.0
    assert attn.shape == (1, slots) and torch.allclose(attn.sum(), torch.tensor(1.0), atol=1e-5)
    other = segmenter.encode_reference(segmenter.set_image(ref), ~ref_mask)
    assert not torch.allclose(memory.slots, other.slots)  # the mask shapes the memory


def test_the_decoder_sees_target_features_conditioned_by_sams_memory_attention(segmenter, images):
    ref, ref_mask, tgt = images
    target = segmenter.set_image(tgt)
    embed = target.features["image_embed"]
    memory = segmenter.encode_reference(segmenter.set_image(ref), ref_mask)
    conditioned = segmenter.condition(embed, memory)
    assert conditioned.shape == embed.shape and not torch.allclose(conditioned, embed)
    other = segmenter.condition(embed, segmenter.encode_reference(segmenter.set_image(ref), ~ref_mask))
    assert not torch.allclose(conditioned, other)  # which structure the reference marks reaches the features
    # the same module call SAM2's video path makes for a frame after its prompted frame
    sam = segmenter.sam
    pix = embed - sam.no_mem_embed.view(1, -1, 1, 1)
    pos = sam.image_encoder.neck.position_encoding(pix)
    direct = sam.memory_attention(curr=[pix.flatten(2).permute(2, 0, 1)], curr_pos=[pos.flatten(2).permute(2, 0, 1)],
                                  memory=memory.slots.transpose(0, 1),
                                  memory_pos=(memory.pos + sam.maskmem_tpos_enc[sam.num_maskmem - 1].view(1, 1, -1))
                                  .transpose(0, 1))
    assert torch.allclose(conditioned, direct.permute(1, 2, 0).reshape(embed.shape), atol=1e-5)


def test_predict_takes_several_tokens_and_batches(segmenter, images):
    ref, ref_mask, tgt = images
    target, memory = segmenter.set_image(tgt), segmenter.encode_reference(segmenter.set_image(ref), ref_mask)
    slots = memory.slots.shape[1]
    h = torch.randn(3, 2, 64)  # 3 queries of 2 <Seg> tokens each
    logits, scores, attn = segmenter.predict(target, h, memory)
    assert logits.shape == (3, 96, 96) and scores.shape == (3,) and attn.shape == (3, 2, slots)
    one, score, one_attn = segmenter.predict(target, h[1], memory)  # (n, llm) -> one query
    assert one.shape == (96, 96) and isinstance(score, float) and one_attn.shape == (2, slots)
    assert torch.allclose(one, logits[1], atol=1e-5)


@pytest.mark.parametrize("dim", PROJECTOR_DIMS)
def test_every_projector_dim(dim, images):
    seg = RAUSegmenter(build_sam2_model(TINY), FusionConfig(llm_hidden_size=64, projector_dim=dim))
    ref, ref_mask, tgt = images
    logits, _, _ = seg.predict(seg.set_image(tgt), torch.randn(1, 64),
                               seg.encode_reference(seg.set_image(ref), ref_mask))
    assert logits.shape == (96, 96)


def test_gradients_only_on_projector_fusion_and_decoder(segmenter, images):
    ref, ref_mask, tgt = images
    x, r = segmenter.images_to_tensor([tgt, tgt]), segmenter.images_to_tensor([ref, ref])
    masks = torch.as_tensor(np.stack([ref_mask, ref_mask]))
    segmenter.zero_grad()
    out = segmenter(x, torch.randn(2, 1, 64), r, masks)
    assert out.shape == (2, 1, TINY.image_size, TINY.image_size)
    out.sigmoid().mean().backward()
    groups = {"projector.": 0.0, "fusion.": 0.0, "sam.sam_mask_decoder.": 0.0}
    for name, p in segmenter.named_parameters():
        group = next((g for g in groups if name.startswith(g)), None)
        assert p.requires_grad == (group is not None), name
        if group is None:
            assert p.grad is None, name  # image encoder, memory encoder, memory attention, prompt encoder
        elif p.grad is not None:
            groups[group] += float(p.grad.abs().sum())
    assert all(total > 0 for total in groups.values()), groups
    assert all(p.grad is None for p in segmenter.sam.image_encoder.parameters())
    segmenter.zero_grad()


def test_memory_encoder_trains_only_when_asked(images):
    ref, ref_mask, tgt = images
    seg = RAUSegmenter(build_sam2_model(TINY), FusionConfig(llm_hidden_size=64, train_memory_encoder=True))
    x, r = seg.images_to_tensor([tgt]), seg.images_to_tensor([ref])
    seg(x, torch.randn(1, 1, 64), r, torch.as_tensor(ref_mask[None])).mean().backward()
    grads = [p.grad for p in seg.sam.memory_encoder.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in seg.sam.image_encoder.parameters())


def test_save_load_trainable_round_trip(segmenter, images, tmp_path):
    ref, ref_mask, tgt = images
    h = torch.randn(1, 64)
    te, mem = segmenter.set_image(tgt), segmenter.encode_reference(segmenter.set_image(ref), ref_mask)
    segmenter.save_trainable(tmp_path / "seg.safetensors")
    assert set(load_file(tmp_path / "seg.safetensors")) == set(segmenter.trainable_state_dict())
    fresh = RAUSegmenter(build_sam2_model(TINY), FusionConfig(llm_hidden_size=64))
    assert not torch.equal(fresh.projector[0].weight, segmenter.projector[0].weight)
    fresh.load_trainable(tmp_path / "seg.safetensors")
    a, _, _ = segmenter.predict(te, h, mem)
    b, _, _ = fresh.predict(fresh.set_image(tgt), h, fresh.encode_reference(fresh.set_image(ref), ref_mask))
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.filterwarnings("ignore:cannot import name '_C'")  # sam2's CUDA hole filling; CPU skips it
def test_memory_ref_baseline_and_volume_propagation(images, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the JPEG frame folders go
    predictor = build_video_predictor(TINY)
    assert type(predictor).__name__ == "SAM2VideoPredictor"
    ref, ref_mask, tgt = images
    mask = memory_ref_baseline(predictor, ref, ref_mask, tgt)
    assert mask.shape == tgt.shape and mask.dtype == bool
    vol = ct_abdomen.generate_3d(0, 0, size=64, depth=10)
    slices = np.stack([apply_window(vol.image[:, :, k].T, "abdomen") for k in range(10)])
    key = vol.label[:, :, 5].T == 1
    out = propagate_volume(predictor, slices, 5, key)
    assert out.shape == (10, 64, 64) and out.dtype == bool
    assert np.array_equal(out[5], key)  # the annotated key slice comes back as given
    with pytest.raises(ValueError, match="outside the volume"):
        propagate_volume(predictor, slices, 10, key)
    assert list(tmp_path.iterdir()) == []  # the frame folders were removed
