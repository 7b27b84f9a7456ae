"""SpinalSAM-R1's CBAM + LoRA adapter on SAM2: what trains, what stays frozen, prompting still works."""

from dataclasses import replace

import numpy as np
import torch

from rau_ray.models.cbam_lora import CBAM, CBAMLoRAConfig, add_cbam_lora
from rau_ray.models.sam2_builder import TINY, build_sam2_model, embed_image, predict_with_prompts, predictor_for


def test_cbam_starts_as_the_identity_and_keeps_shape_and_attention_in_range():
    cbam = CBAM(32, reduction=8)
    x = torch.randn(2, 32, 9, 11)
    assert torch.equal(cbam(x), x)  # an adapter on pretrained features: exactly the identity before training
    with torch.no_grad():
        for p in cbam.parameters():
            p.normal_(0, 0.5)
    y = cbam(x)
    channel, spatial = cbam.last_attention
    assert y.shape == x.shape
    assert channel.shape == (2, 32, 1, 1) and spatial.shape == (2, 1, 9, 11)
    for a in (channel, spatial):
        assert (a > 0).all() and (a <= 2).all() and a.std() > 0
    assert torch.allclose(y, x * channel * spatial)


def test_the_adapter_leaves_the_pretrained_sam2_as_it_is_before_training():
    image = torch.randn(1, 3, TINY.image_size, TINY.image_size)
    plain = build_sam2_model(TINY).eval()
    with torch.no_grad():
        want = plain.forward_image(image)["backbone_fpn"]
        got = add_cbam_lora(build_sam2_model(TINY)).eval().forward_image(image)["backbone_fpn"]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(want, got))


def test_only_lora_and_cbam_train_and_frozen_weights_stay_bit_identical():
    rank = 4
    plain = build_sam2_model(replace(TINY, init="random", image_size=128))  # the adapter's mechanics, fresh model
    # hand count: every Hiera attention qkv / proj Linear gets A (r x in) and B (out x r)
    attn_linears = [m for n, m in plain.named_modules() if n.startswith("image_encoder.trunk.blocks.")
                    and n.endswith(("attn.qkv", "attn.proj"))]
    expected_lora = sum(rank * (m.in_features + m.out_features) for m in attn_linears)
    assert expected_lora == rank * 1712  # tiny Hiera dims 16/32/64/128, stages [1,1,2,1]

    model = add_cbam_lora(plain, CBAMLoRAConfig(rank=rank))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for n, p in trainable.items() if "lora_" in n) == expected_lora
    assert all("lora_" in n or ".cbam." in n for n in trainable)
    assert len(model.image_encoder.neck.cbam) == 3  # SAM2 keeps 3 of the neck's 4 levels (scalp=1)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}

    model.train()
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    images = torch.randn(1, 3, 128, 128)
    for _ in range(2):  # two steps: lora_B starts at zero, so lora_A moves only from the second step
        opt.zero_grad()
        out = model.forward_image(images)
        (sum(f.square().mean() for f in out["backbone_fpn"])).backward()
        opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    unchanged = [n for n, p in trainable.items() if torch.equal(p, before[n])]
    assert unchanged == []


def test_mask_decoder_trains_when_asked():
    model = add_cbam_lora(build_sam2_model(TINY), CBAMLoRAConfig(train_mask_decoder=True))
    decoder = [p.requires_grad for n, p in model.named_parameters() if n.startswith("sam_mask_decoder.")]
    assert decoder and all(decoder)
    assert not any(p.requires_grad for p in model.memory_encoder.parameters())


def test_point_and_box_prompts_still_work():
    model = add_cbam_lora(build_sam2_model(TINY)).eval()
    predictor = predictor_for(model)
    image = (np.random.default_rng(1).random((64, 80)) * 255).astype(np.uint8)
    emb = embed_image(predictor, image)
    masks, scores, _ = predict_with_prompts(predictor, emb, points=np.array([[20, 30]]), labels=np.array([1]))
    assert masks.shape == (1, 64, 80) and scores.shape == (1,)
    masks, _, _ = predict_with_prompts(predictor, emb, box=np.array([5, 5, 60, 50]))
    assert masks.shape == (1, 64, 80)
