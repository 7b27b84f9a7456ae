"""SpinalSAM-R1's CBAM + LoRA adapter on SAM2: what trains, what stays frozen, prompting still works."""

import numpy as np
import torch
from torch import nn

from rau_ray.models.cbam_lora import CBAM, CBAMLoRAConfig, add_cbam_lora
from rau_ray.models.sam2_builder import TINY, build_sam2_model, embed_image, predict_with_prompts, predictor_for


def test_cbam_keeps_shape_and_attention_in_unit_interval():
    cbam = CBAM(32, reduction=8)
    x = torch.randn(2, 32, 9, 11)
    y = cbam(x)
    channel, spatial = cbam.last_attention
    assert y.shape == x.shape
    assert channel.shape == (2, 32, 1, 1) and spatial.shape == (2, 1, 9, 11)
    for a in (channel, spatial):
        assert (a > 0).all() and (a < 1).all()


def test_only_lora_and_cbam_train_and_frozen_weights_stay_bit_identical():
    model = add_cbam_lora(build_sam2_model(TINY), CBAMLoRAConfig(rank=4))
    lora_layers = [m for n, m in model.named_modules() if n.endswith(("attn.qkv", "attn.proj"))
                   and hasattr(m, "lora_A")]
    expected_lora = sum(4 * (m.in_features + m.out_features) for m in lora_layers)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for n, p in trainable.items() if "lora_" in n) == expected_lora
    assert all("lora_" in n or ".cbam." in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    model.train()
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    images = torch.randn(1, 3, TINY.image_size, TINY.image_size)
    for _ in range(2):  # two steps: lora_B starts at zero, so lora_A moves only from the second step
        opt.zero_grad()
        out = model.forward_image(images)
        (sum(f.square().mean() for f in out["backbone_fpn"])).backward()
        opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    moved = [n for n, p in trainable.items() if "lora_B" in n or ".cbam." in n]
    assert moved and all(not torch.equal(trainable[n], torch.zeros_like(trainable[n])) for n in moved
                         if "lora_B" in n)


def test_point_and_box_prompts_still_work():
    model = add_cbam_lora(build_sam2_model(TINY)).eval()
    predictor = predictor_for(model)
    image = (np.random.default_rng(1).random((64, 80)) * 255).astype(np.uint8)
    emb = embed_image(predictor, image)
    masks, _, _ = predict_with_prompts(predictor, emb, points=np.array([[20, 30]]), labels=np.array([1]))
    assert masks.shape == (1, 64, 80)
    masks, _, _ = predict_with_prompts(predictor, emb, box=np.array([5, 5, 60, 50]))
    assert masks.shape == (1, 64, 80)
