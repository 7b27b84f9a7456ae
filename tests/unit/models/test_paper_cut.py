"""The paper-cut builders without writing the 3 GB folder: Qwen2.5-VL-7B's config cut in depth only, its image
processor, the fast random fill, the model section the paper profile loads by path.
(tests/integration/test_paper_width.py writes the folder and runs every part on it.)"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from rau_ray.models import paper_cut


def test_qwen_config_keeps_the_7bs_widths_and_cuts_depth():
    processor = paper_cut.qwen_processor(56 * 56, 56 * 56)
    tok = processor.tokenizer
    cfg = paper_cut.qwen_config(tok)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads, t.vocab_size,
            t.num_hidden_layers, t.tie_word_embeddings) == (3584, 18944, 28, 4, 152064, 2, False)
    assert (v.hidden_size, v.out_hidden_size, v.intermediate_size, v.num_heads, v.depth, v.patch_size,
            v.fullatt_block_indexes) == (1280, 3584, 3420, 16, 2, 14, [1])
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>") < len(tok) < t.vocab_size
    assert t.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    full = paper_cut.qwen_config(tok, layers=28, vision_blocks=32)
    assert (full.text_config.num_hidden_layers, full.vision_config.depth,
            full.vision_config.fullatt_block_indexes) == (28, 32, [7, 15, 23, 31])


def test_qwen_processor_makes_14px_patches():
    processor = paper_cut.qwen_processor(56 * 56, 56 * 56)
    out = processor.image_processor(images=[Image.fromarray(np.zeros((64, 64, 3), np.uint8))], return_tensors="pt")
    # 56 x 56 px: 4 x 4 patches of 3 x 2 x 14 x 14 values, merged 2 x 2 into 4 visual tokens
    assert tuple(out["pixel_values"].shape) == (16, 3 * 2 * 14 * 14)
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_fill_random_is_normal_with_unit_norms_and_zero_biases():
    torch.manual_seed(1)
    module = torch.nn.Sequential(torch.nn.Linear(300, 200), torch.nn.LayerNorm(200), torch.nn.Linear(200, 50))
    for p in module.parameters():
        torch.nn.init.constant_(p, 7.0)
    paper_cut.fill_random(module, std=0.02, block=10_007)
    first, second = module[0].weight, module[2].weight
    assert abs(float(first.std()) - 0.02) < 0.002 and abs(float(first.mean())) < 0.002
    assert not torch.equal(first[0, :50], first[1, :50]) and not torch.equal(first.view(-1)[:50],
                                                                            second.view(-1)[:50])
    assert torch.all(module[0].bias == 0) and torch.all(module[1].weight == 1) and torch.all(module[1].bias == 0)


def test_model_section_loads_by_path_through_the_paper_profile(tmp_path):
    cfg = paper_cut.paper_cut_config(tmp_path)
    assert cfg.profile == "paper" and cfg.policy.dtype == "bfloat16" and cfg.policy.lora_rank == 16
    assert cfg.policy.model == str(tmp_path.resolve() / paper_cut.POLICY_DIR)
    assert cfg.retrieval.embedder == str(tmp_path.resolve() / paper_cut.DINO_DIR)
    assert cfg.sam2.config.endswith("sam2.1_hiera_l.yaml") and cfg.sam2.image_size == 256
    assert cfg.sam2.checkpoint.endswith(paper_cut.SAM2_FILE) and "++model.image_size=256" in cfg.sam2.hydra_overrides()
    assert cfg.fusion.llm_hidden_size == 3584 and cfg.max_new_tokens == paper_cut.MAX_NEW_TOKENS
