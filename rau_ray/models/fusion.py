"""RAU's segmentation route: ``<Seg>`` hidden state -> MLP projector -> SAM2 memory attention -> SAM2 mask decoder.

The paper's critical path, on SAM2's own modules. The reference image + mask go through SAM2's memory encoder into
memory slots. The target's image features are conditioned on them by SAM2's memory attention, exactly as SAM2's
video path conditions a frame on a prompted frame (SAM2-Memory-Ref's route: what memory propagation knows). The
projected ``<Seg>`` query retrieves memory slots by dot-product attention (RAU Eq. 6-7) into a fused token that
says *which* structure; the mask decoder takes the conditioned features, SAM2's no-prompt tokens and that token.
The image encoder, memory encoder and memory attention stay frozen (SAM2's, pretrained); the projector, the fusion
and the mask decoder train. The SAM2-Memory-Ref baseline and 3D propagation (SAM2's own video memory, no VLM) live
in ``memory_ref`` and are re-exported here.
Use: ``seg = RAUSegmenter(build_sam2_model(), FusionConfig(llm_hidden_size=128))``;
``logits, score, attn = seg.predict(seg.set_image(target), h_seg, seg.encode_reference(seg.set_image(ref), mask))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from rau_ray.errors import ConfigError
from rau_ray.models.memory_ref import memory_ref_baseline, propagate_volume  # noqa: F401  (the baselines)
from rau_ray.models.sam2_builder import ImageEmbedding, as_rgb_uint8, embed_image, predictor_for

PROJECTOR_DIMS = (128, 256, 512, 1024)


@dataclass(frozen=True)
class FusionConfig:
    llm_hidden_size: int = 64  # the policy's hidden size (tiny 128, Qwen2.5-VL-7B 3584)
    projector_dim: int = 256  # RAU's projector width; Ray Tune sweeps 128/256/512/1024
    num_heads: int = 4  # attention heads of the <Seg> query over memory slots
    dropout: float = 0.0  # attention dropout; 0 keeps tiny runs deterministic, small data may want 0.1
    train_memory_encoder: bool = False  # SAM2's memory encoder frozen unless asked (its memory attention always)

    def validate(self) -> None:
        if self.projector_dim % self.num_heads:
            raise ConfigError(f"fusion.projector_dim ({self.projector_dim}) must be divisible by num_heads "
                              f"({self.num_heads})")


class SegProjector(nn.Sequential):
    """MLP from the policy's hidden size into the projector space."""

    def __init__(self, llm_hidden: int, dim: int):
        super().__init__(nn.Linear(llm_hidden, dim), nn.GELU(), nn.Linear(dim, dim))


class MemoryFusion(nn.Module):
    """The projected query attends over memory slots (+ positions); returns SAM2 sparse prompt tokens."""

    def __init__(self, dim: int, mem_dim: int, sam_hidden: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, kdim=mem_dim, vdim=mem_dim, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, sam_hidden)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor):
        fused, weights = self.attn(query, memory + pos, memory, need_weights=True)
        return self.out(self.norm(query + fused)), weights  # (B, n, sam_hidden), (B, n, slots)


@dataclass
class ReferenceMemory:
    """A reference image + mask through SAM2's memory encoder, flattened to slots."""

    slots: torch.Tensor  # (1, h*w, mem_dim)
    pos: torch.Tensor  # (1, h*w, mem_dim)


class RAUSegmenter(nn.Module):
    """SAM2 (frozen image encoder) + <Seg> projector + memory fusion; trains projector, fusion, mask decoder."""

    def __init__(self, sam2_model, cfg: FusionConfig = FusionConfig()):
        super().__init__()
        cfg.validate()
        self.cfg, self.sam = cfg, sam2_model
        mem_dim = sam2_model.mem_dim  # the memory encoder's output width (SAM2Base derives it)
        self.projector = SegProjector(cfg.llm_hidden_size, cfg.projector_dim)
        self.fusion = MemoryFusion(cfg.projector_dim, mem_dim, sam2_model.hidden_dim, cfg.num_heads, cfg.dropout)
        self.predictor = predictor_for(sam2_model)
        # the fused token drives one mask, the one training teaches; SAM2.1's eval-time swap to one of its
        # (untrained) multimask outputs when that mask looks unstable would throw it away
        self.sam.sam_mask_decoder.dynamic_multimask_via_stability = False
        for name, p in self.sam.named_parameters():
            p.requires_grad = name.startswith("sam_mask_decoder.") or (
                cfg.train_memory_encoder and name.startswith("memory_encoder."))

    def train(self, mode: bool = True) -> RAUSegmenter:
        """Frozen SAM2 parts stay in eval mode (SAM2's memory attention has dropout): training only what trains."""
        super().train(mode)
        self.sam.image_encoder.eval()
        self.sam.memory_attention.eval()
        if not self.cfg.train_memory_encoder:
            self.sam.memory_encoder.eval()
        return self

    # -- one image at a time (serving, eval) --------------------------------------------------------------------
    def set_image(self, image: np.ndarray) -> ImageEmbedding:
        """The expensive part, once per image: SAM2's image encoder."""
        return embed_image(self.predictor, image)

    def _mask_for_memory(self, mask: torch.Tensor) -> torch.Tensor:
        s = self.sam.image_size
        m = F.interpolate(mask.float()[:, None], size=(s, s), mode="bilinear", align_corners=False)
        return m * self.sam.sigmoid_scale_for_mem_enc + self.sam.sigmoid_bias_for_mem_enc  # as SAM2 does for masks

    def _memory(self, image_embed: torch.Tensor, mask: torch.Tensor) -> ReferenceMemory:
        pix = image_embed  # the memory encoder takes the raw features; SAM2.1's set_image added no_mem_embed
        if self.sam.directly_add_no_mem_embed:
            pix = image_embed - self.sam.no_mem_embed.view(1, -1, 1, 1)
        out = self.sam.memory_encoder(pix, self._mask_for_memory(mask), skip_mask_sigmoid=True)
        feats, pos = out["vision_features"], out["vision_pos_enc"][-1]
        return ReferenceMemory(feats.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2).to(feats.dtype))

    def encode_reference(self, ref: ImageEmbedding, mask: np.ndarray) -> ReferenceMemory:
        """Reference image features + the structure's mask through SAM2's memory encoder -> memory slots."""
        m = torch.as_tensor(np.asarray(mask, dtype=bool), device=ref.features["image_embed"].device)[None]
        with torch.set_grad_enabled(self.cfg.train_memory_encoder and torch.is_grad_enabled()):
            return self._memory(ref.features["image_embed"], m)

    def condition(self, image_embed: torch.Tensor, memory: ReferenceMemory) -> torch.Tensor:
        """(B, C, h, w) target features as set_image gives them -> conditioned on the reference memory by SAM2's
        memory attention, as SAM2's video path does for a frame after a prompted one
        (``SAM2Base._prepare_memory_conditioned_features`` with one conditioning frame, no object pointers)."""
        sam = self.sam
        pix = image_embed - sam.no_mem_embed.view(1, -1, 1, 1) if sam.directly_add_no_mem_embed else image_embed
        b, c, h, w = pix.shape
        pos = sam.image_encoder.neck.position_encoding(pix).to(pix.dtype)
        mem_pos = memory.pos + sam.maskmem_tpos_enc[sam.num_maskmem - 1].view(1, 1, -1)  # a conditioning frame
        with torch.set_grad_enabled(self.cfg.train_memory_encoder and torch.is_grad_enabled()):
            out = sam.memory_attention(curr=[pix.flatten(2).permute(2, 0, 1)],
                                       curr_pos=[pos.flatten(2).permute(2, 0, 1)],
                                       memory=memory.slots.transpose(0, 1).expand(-1, b, -1),
                                       memory_pos=mem_pos.transpose(0, 1).expand(-1, b, -1), num_obj_ptr_tokens=0)
        return out.permute(1, 2, 0).reshape(b, c, h, w)

    def memory_only(self) -> RAUSegmenter:
        """SAM2-Memory-Ref-SFT: no ``<Seg>`` query (``seg_hidden=None`` everywhere); only the decoder trains."""
        self.projector.requires_grad_(False)
        self.fusion.requires_grad_(False)
        return self

    def _decode(self, image_embed, high_res, seg_hidden, memory: ReferenceMemory):
        """``seg_hidden`` None: memory propagation alone (SAM2-Memory-Ref-SFT), no fused token, no attention."""
        b = image_embed.shape[0]
        conditioned = self.condition(image_embed, memory)
        tokens = attn = None
        if seg_hidden is not None:
            query = self.projector(seg_hidden)  # (B, n, P)
            tokens, attn = self.fusion(query, memory.slots.expand(b, -1, -1), memory.pos.expand(b, -1, -1))
        pe = self.sam.sam_prompt_encoder
        # SAM2's tokens for "no prompt" (its video path on a frame without clicks), then the fused <Seg> token
        no_prompt, dense = pe(points=(torch.zeros(b, 1, 2, device=conditioned.device),
                                      -torch.ones(b, 1, dtype=torch.int32, device=conditioned.device)),
                              boxes=None, masks=None)
        sparse = no_prompt if tokens is None else torch.cat([no_prompt.to(tokens.dtype), tokens], 1)
        low_res, iou, _, _ = self.sam.sam_mask_decoder(
            image_embeddings=conditioned, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=False, repeat_image=False,
            high_res_features=high_res if self.sam.use_high_res_features_in_sam else None)
        return low_res, iou[:, 0], attn

    @torch.no_grad()
    def predict(self, target: ImageEmbedding, seg_hidden: torch.Tensor, memory: ReferenceMemory):
        """Mask logits at the target's original size, a confidence score, and the <Seg> attention over slots.

        ``seg_hidden`` (n, llm_hidden): one query of n tokens -> (H, W) logits, float score, (n, slots) attention.
        (B, n, llm_hidden): B queries on the same target -> (B, H, W), (B,) scores, (B, n, slots).
        """
        embed = target.features["image_embed"]
        h = None if seg_hidden is None else seg_hidden.to(embed.device, embed.dtype)
        b = h.shape[0] if h is not None and h.dim() == 3 else 1
        low_res, iou, attn = self._decode(embed.expand(b, -1, -1, -1),
                                          [f.expand(b, -1, -1, -1) for f in target.features["high_res_feats"]],
                                          None if h is None else h.reshape(b, -1, h.shape[-1]), memory)
        logits = self.predictor._transforms.postprocess_masks(low_res, target.orig_hw)[:, 0]
        if h is not None and h.dim() == 3:
            return logits, iou, attn
        return logits[0], float(iou[0]), None if attn is None else attn[0]  # SAM2.1's IoU is a sigmoid already

    # -- batches (training) ------------------------------------------------------------------------------------
    def images_to_tensor(self, images: list[np.ndarray]) -> torch.Tensor:
        """uint8 images -> SAM2's normalised (B, 3, S, S) input."""
        return torch.stack([self.predictor._transforms(as_rgb_uint8(im)) for im in images]).to(self.device)

    @property
    def device(self) -> torch.device:
        return self.projector[0].weight.device

    def _encode(self, images: torch.Tensor):
        with torch.no_grad():  # the image encoder is frozen
            backbone = self.sam.forward_image(images)
            _, feats, _, _ = self.sam._prepare_backbone_features(backbone)
            if self.sam.directly_add_no_mem_embed:
                feats[-1] = feats[-1] + self.sam.no_mem_embed
            b, s = images.shape[0], images.shape[-1]
            sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
            maps = [f.permute(1, 2, 0).view(b, -1, *hw) for f, hw in zip(feats[::-1], sizes[::-1])][::-1]
        return maps[-1], maps[:-1]

    def forward(self, target_images: torch.Tensor, seg_hidden: torch.Tensor, ref_images: torch.Tensor,
                ref_masks: torch.Tensor) -> torch.Tensor:
        """Training: (B,3,S,S) targets, (B,n,llm) <Seg> states (None: memory alone), (B,3,S,S) references,
        (B,H,W) masks -> mask logits (B, 1, S, S)."""
        t_embed, t_high = self._encode(target_images)
        r_embed, _ = self._encode(ref_images)
        logits = []
        for i in range(target_images.shape[0]):  # one reference memory per sample
            with torch.set_grad_enabled(self.cfg.train_memory_encoder and torch.is_grad_enabled()):
                memory = self._memory(r_embed[i:i + 1], ref_masks[i:i + 1])
            low, _, _ = self._decode(t_embed[i:i + 1], [h[i:i + 1] for h in t_high],
                                     None if seg_hidden is None else seg_hidden[i:i + 1], memory)
            logits.append(low)
        s = target_images.shape[-1]
        return F.interpolate(torch.cat(logits), size=(s, s), mode="bilinear", align_corners=False)

    # -- persistence ---------------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if p.requires_grad}

    def save_trainable(self, path: str | Path) -> None:
        save_file(self.trainable_state_dict(), str(path))

    def load_trainable(self, path: str | Path) -> None:
        state = load_file(str(path))
        missing = set(self.trainable_state_dict()) - set(state)
        if missing:
            raise ValueError(f"{path}: missing trained parameters {sorted(missing)[:5]}...")
        self.load_state_dict(state, strict=False)
