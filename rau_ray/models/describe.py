"""Parameter counts per component of a profile (``rau models describe --profile tiny --json``).

Components whose weights are here are counted as loaded (tiny: always); describing never downloads. Otherwise the
architecture is instantiated from its published configuration — Qwen2.5-VL-7B-Instruct and DINOv2-base on
PyTorch's ``meta`` device (exact counts, no memory), SAM2.1 hiera-large randomly initialised on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from peft import LoraConfig, get_peft_model
from sam2.build_sam import build_sam2
from transformers import Dinov2Config, Dinov2Model, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from rau_ray.models.cbam_lora import add_cbam_lora
from rau_ray.models.fusion import RAUSegmenter
from rau_ray.models.policy import load_policy
from rau_ray.models.profiles import ModelConfig
from rau_ray.models.retrieval import Embedder
from rau_ray.models.sam2_builder import build_sam2_model

# Published architecture of Qwen/Qwen2.5-VL-7B-Instruct (its config.json), for counting without the weights.
QWEN25_VL_7B = {
    "text_config": {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 128000,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0,
                                        "mrope_section": [16, 24, 24]}, "tie_word_embeddings": False},
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                      "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                      "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
    "tie_word_embeddings": False,
}


def _available(name: str) -> bool:
    """Weights that are here (tiny, a local folder, the Hugging Face cache): describing never downloads."""
    return name == "tiny" or Path(name).expanduser().exists() or isinstance(
        try_to_load_from_cache(name, "config.json"), str)


def _counts(module: torch.nn.Module, source: str) -> dict:
    params = list(module.parameters())
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad),
            "source": source}


def _policy_architecture(cfg: ModelConfig) -> dict:
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_7B))
        model.resize_token_embeddings(QWEN25_VL_7B["text_config"]["vocab_size"] + 1, mean_resizing=False)
        seg = QWEN25_VL_7B["text_config"]["vocab_size"]
        p = cfg.policy
        model = get_peft_model(model, LoraConfig(
            r=p.lora_rank, lora_alpha=p.lora_alpha, target_modules=rf".*language_model.*\.({'|'.join(p.lora_targets)})",
            trainable_token_indices={"embed_tokens": [seg], "lm_head": [seg]}))
    return _counts(model, "architecture (meta device, Qwen2.5-VL-7B config)")


def _sam2(cfg: ModelConfig):
    """A fresh SAM2: loaded when its checkpoint is here, else the architecture on the meta device."""
    if cfg.sam2.checkpoint == "tiny" or Path(cfg.sam2.checkpoint).is_file():
        return build_sam2_model(cfg.sam2), "weights"
    model = build_sam2(cfg.sam2.config, None, device="cpu", hydra_overrides_extra=cfg.sam2.hydra_overrides())
    return model, "architecture (random init, SAM2.1 config)"  # Hiera's init cannot run on the meta device


def describe(cfg: ModelConfig) -> dict:
    out: dict = {"profile": cfg.profile}
    if _available(cfg.retrieval.embedder):
        out["retrieval"] = _counts(Embedder(cfg.retrieval, device="cpu").model, "weights")
    else:
        with torch.device("meta"):
            out["retrieval"] = _counts(Dinov2Model(Dinov2Config()), "architecture (meta device, DINOv2-base config)")
    if _available(cfg.policy.model):
        out["policy"] = _counts(load_policy(cfg.policy).model, "weights")
    else:
        out["policy"] = _policy_architecture(cfg)
    sam, source = _sam2(cfg)
    out["sam2"] = _counts(sam, source)
    out["fusion_segmenter"] = {**_counts(RAUSegmenter(sam, cfg.fusion), source),
                               "note": "projector + memory fusion + SAM2; trains projector, fusion, mask decoder"}
    out["cbam_lora_sam2"] = _counts(add_cbam_lora(_sam2(cfg)[0], cfg.cbam_lora), source)
    out["total"] = sum(out[k]["total"] for k in ("retrieval", "policy", "fusion_segmenter"))
    return out
