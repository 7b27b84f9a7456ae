"""The paper profile at full width with its depth and input size cut: random bf16 weights, written once to a folder.

``write_paper_cut(folder)`` writes three model folders from the published configurations, with every width kept and
only the depth cut, and returns the ``ModelConfig`` that loads them by path through the paper profile's own code
(``model_config_from({"profile": "paper", ...})``: ``from_pretrained`` of a local folder, sam2's builder on a
``.pt``):
- ``qwen2_5_vl_7b-cut/``: Qwen2.5-VL-7B-Instruct's config.json (hidden 3584, MLP 18944, 28 heads / 4 KV heads, its
  152064-row vocabulary, vision tower 1280 wide into 3584) with 2 decoder layers and 2 vision blocks. The tokenizer is
  the tiny profile's byte-level BPE (Qwen2.5-VL's special tokens and chat template, ~1.5k tokens) with Qwen2.5-VL's
  image processor (14 px patches, 2x2 merge): the embedding matrix and output head have the 7B's 152064 rows, so
  ``<Seg>`` takes a spare row and nothing is resized, as with the 7B.
- ``dinov2-base-cut/``: DINOv2-base (768 wide, 12 heads, 14 px patches) with 2 layers, its 256 -> 224 crop
  preprocessing.
- ``sam2.1_hiera_large-cut.pt``: SAM2.1 hiera-large (144-channel Hiera, 2 heads, 256-wide neck and decoder, 64-wide
  memory) with 5 Hiera blocks instead of 48, one memory-attention layer instead of 4, at 256 px instead of 1024.
The returned config keeps the paper's LoRA (r16 on attention), bf16 policy and fusion (3584 -> 256), and cuts the
inputs: 56 x 56 px policy images (4 visual tokens each) and ``max_new_tokens`` 4. ~1.6 B parameters, ~3.2 GB on disk.
What runs it: ``benchmarks/paper_width.py`` (predict, SFT, GRPO, segmenter, Serve) and ``benchmarks/gpu_latency.py
--scale paper-cut``.
Use: ``cfg = write_paper_cut("/tmp/paper-cut")``; ``RAUModel.build(cfg)``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from sam2.build_sam import build_sam2
from transformers import (
    AutoProcessor,
    BitImageProcessor,
    Dinov2Config,
    Dinov2Model,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)
from transformers.initialization import no_init_weights

from rau_ray.atomic import atomic_dir, atomic_open, atomic_write_text
from rau_ray.models import pretrained
from rau_ray.models.describe import QWEN25_VL_7B
from rau_ray.models.policy import CHAT_TEMPLATE, DTYPES, PolicyConfig, tiny_spec
from rau_ray.models.profiles import ModelConfig, get_profile, model_config_from

POLICY_DIR, DINO_DIR, SAM2_FILE = "qwen2_5_vl_7b-cut", "dinov2-base-cut", "sam2.1_hiera_large-cut.pt"
COMPLETE = ".complete"  # written last: a folder without it is rewritten
DECODER_LAYERS, VISION_BLOCKS, DINO_LAYERS = 2, 2, 2  # the 7B's 28 / 32, DINOv2-base's 12
SAM2_IMAGE_SIZE = 256  # the paper's 1024
POLICY_SIDE = 56  # px: a 56 x 56 image is 4 x 4 patches of 14 px, 2 x 2 visual tokens after merging
MAX_NEW_TOKENS = 4
RANDOM_BLOCK = 4_194_301  # a prime: the period of fill_random's values

# DINOv2-base (facebook/dinov2-base config.json / preprocessor_config.json): transformers' Dinov2Config defaults are
# its architecture; written out so the cut is visible
DINOV2_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4,
               "patch_size": 14, "image_size": 518, "layerscale_value": 1.0, "hidden_act": "gelu",
               "layer_norm_eps": 1e-6, "qkv_bias": True, "use_swiglu_ffn": False}
DINOV2_BASE_PREPROCESSING = {"size": {"shortest_edge": 256}, "crop_size": {"height": 224, "width": 224},
                             "do_center_crop": True, "resample": 3, "image_mean": [0.485, 0.456, 0.406],
                             "image_std": [0.229, 0.224, 0.225]}
# SAM2.1 hiera-large (sam2's configs/sam2.1/sam2.1_hiera_l.yaml: stages [2, 6, 36, 4], global attention in blocks
# 23, 33, 43 of stage 3, four memory-attention layers): one block a stage and two in stage 3, whose second one
# attends globally (a stage's first block pools, and cannot), one memory-attention layer
SAM2_LARGE_CUT = ("++model.image_encoder.trunk.stages=[1,1,2,1]", "++model.image_encoder.trunk.global_att_blocks=[3]",
                  "++model.memory_attention.num_layers=1")


def qwen_config(tokenizer, layers: int = DECODER_LAYERS, vision_blocks: int = VISION_BLOCKS) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-7B-Instruct's architecture with ``layers`` decoder layers and ``vision_blocks`` vision blocks (the
    7B: 28 and 32; its full-attention vision blocks every 8th, the last one kept), special token ids of
    ``tokenizer``."""
    arch = json.loads(json.dumps(QWEN25_VL_7B))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                            "<|vision_end|>", "<|im_end|>", "<|endoftext|>")}
    arch["text_config"].update(num_hidden_layers=layers, rms_norm_eps=1e-6, hidden_act="silu",
                               bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                               pad_token_id=ids["<|endoftext|>"])
    full = [i for i in arch["vision_config"]["fullatt_block_indexes"] if i < vision_blocks] or [vision_blocks - 1]
    arch["vision_config"].update(depth=vision_blocks, fullatt_block_indexes=full, hidden_act="silu",
                                 tokens_per_second=2)
    return Qwen2_5_VLConfig(**arch, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def qwen_processor(min_pixels: int, max_pixels: int) -> Qwen2_5_VLProcessor:
    """The tiny profile's tokenizer (offline; Qwen2.5-VL's special tokens and chat template) with Qwen2.5-VL's own
    image / video processors (14 px patches, 2 x 2 merge, CLIP normalisation) within the given pixel bounds."""
    tiny = AutoProcessor.from_pretrained(pretrained.shipped("policy", tiny_spec(PolicyConfig())))
    bounds = {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}, "patch_size": 14, "merge_size": 2,
              "temporal_patch_size": 2}
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**bounds), tokenizer=tiny.tokenizer,
                               video_processor=Qwen2VLVideoProcessor(**bounds), chat_template=CHAT_TEMPLATE)


def fill_random(module: torch.nn.Module, std: float = 0.02, seed: int = 0, block: int = RANDOM_BLOCK) -> None:
    """Random weights, fast: every matrix gets N(0, std) values from one block of ``block`` draws, repeated with that
    (prime) period, so rows and layers start at different offsets; vectors named ``bias`` are 0, other vectors (norm
    scales) 1. Drawing 1.6 B normals one by one takes ~30 s on 2 loaded cores; this is a memory copy."""
    device = next(module.parameters()).device
    values = (torch.randn(block, generator=torch.Generator().manual_seed(seed)) * std).to(device)
    offset = 0
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                flat = p.view(-1)
                start = offset % block
                for i in range(0, flat.numel(), block):
                    part = flat[i:i + block]
                    n = part.numel()
                    head = values[start:start + n]
                    part[:len(head)].copy_(head)
                    if len(head) < n:
                        part[len(head):].copy_(values[:n - len(head)])
                offset += flat.numel() + 7919
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)


def random_qwen(config: Qwen2_5_VLConfig, dtype: str = "bfloat16", device: str = "cpu", seed: int = 0):
    """Qwen2.5-VL of ``config`` built directly in ``dtype`` with ``fill_random``'s weights (transformers' own init,
    N(0, 0.02) one draw at a time, is skipped)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])
    try:
        with torch.device(device), no_init_weights():
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    fill_random(model, config.text_config.initializer_range, seed)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return model


def model_section(folder: str | Path) -> dict:
    """The ``model:`` section of a job config (``model_config_from``) that loads the paper-cut models in
    ``folder``: the paper profile, its weights by path, the cut inputs."""
    folder = Path(folder).resolve()
    return {"profile": "paper",
            "policy": {"model": str(folder / POLICY_DIR), "min_pixels": POLICY_SIDE ** 2,
                       "max_pixels": POLICY_SIDE ** 2},
            "retrieval": {"embedder": str(folder / DINO_DIR), "batch_size": 8, "device": "cpu"},
            "sam2": {"checkpoint": str(folder / SAM2_FILE), "image_size": SAM2_IMAGE_SIZE,
                     "overrides": list(SAM2_LARGE_CUT), "device": "cpu"},
            "max_new_tokens": MAX_NEW_TOKENS}


def paper_cut_config(folder: str | Path) -> ModelConfig:
    return model_config_from(model_section(folder), f"{folder}: paper-cut")


def write_paper_cut(folder: str | Path, seed: int = 0) -> ModelConfig:
    """The three model folders in ``folder`` (written once: a folder holding ``.complete`` is reused), and the
    ``ModelConfig`` that loads them."""
    folder = Path(folder)
    cfg = paper_cut_config(folder)  # checks the section before anything is written
    if (folder / COMPLETE).is_file():
        return cfg
    paper = get_profile("paper")
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with atomic_dir(folder / POLICY_DIR) as tmp:
        processor = qwen_processor(cfg.policy.min_pixels, cfg.policy.max_pixels)
        model = random_qwen(qwen_config(processor.tokenizer), paper.policy.dtype, seed=seed)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        del model
    with atomic_dir(folder / DINO_DIR) as tmp:
        dino = Dinov2Model(Dinov2Config(**{**DINOV2_BASE, "num_hidden_layers": DINO_LAYERS}))
        dino.save_pretrained(tmp)
        BitImageProcessor(**DINOV2_BASE_PREPROCESSING).save_pretrained(tmp)
    sam = build_sam2(paper.sam2.config, None, device="cpu", hydra_overrides_extra=cfg.sam2.hydra_overrides())
    with atomic_open(folder / SAM2_FILE, "wb") as f:  # the layout of SAM2's release .pt
        torch.save({"model": sam.state_dict()}, f)
    atomic_write_text(folder / "model_section.json", json.dumps(model_section(folder), indent=1))
    atomic_write_text(folder / COMPLETE, json.dumps(asdict(cfg), default=str))
    return cfg

