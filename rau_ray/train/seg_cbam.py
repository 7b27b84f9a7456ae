"""Segmenter training, mode cbam-lora: SpinalSAM-R1's SAM2 with CBAM + LoRA, prompted and corrected interactively.

``PromptedSAM2``: SAM2 as its image predictor runs it, batched and with gradients, a box (or point) from the true mask
first, then ``interactive_rounds`` rounds of corrective clicks sampled from the previous prediction's error region,
the previous logits as the mask prompt. ``CBAMLoRASegTrainer`` trains CBAM + LoRA (+ the mask decoder) through the
loss summed over rounds.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rau_ray.models.cbam_lora import add_cbam_lora
from rau_ray.models.losses import focal_dice_loss, sample_corrective_points
from rau_ray.models.sam2_builder import as_rgb_uint8, build_sam2_model, predictor_for
from rau_ray.scoring.metrics import mask_to_box
from rau_ray.train.seg_base import SegJobConfig, SegTrainer, check_keys, dice_at, resize_masks, single_mask_output


# -- the prompted SAM2 of cbam-lora --------------------------------------------------------------------------------
class PromptedSAM2(nn.Module):
    """SAM2 as ``SAM2ImagePredictor`` runs it (image encoder -> prompt encoder -> mask decoder, no object-score
    gating), batched and with gradients, plus SAM2's interactive rounds. One ``forward`` per optimizer step, so
    DDP sees every round."""

    def __init__(self, sam):
        super().__init__()
        self.sam = sam

    def encode(self, images: torch.Tensor):
        """(B, 3, S, S) normalised images -> image embedding (B, C, S/16, S/16) + high-res features (S/4, S/8)."""
        sam = self.sam
        backbone = sam.forward_image(images)
        _, feats, _, _ = sam._prepare_backbone_features(backbone)
        if sam.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + sam.no_mem_embed
        b, s = images.shape[0], images.shape[-1]
        sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
        maps = [f.permute(1, 2, 0).reshape(b, -1, *hw) for f, hw in zip(feats[::-1], sizes[::-1])][::-1]
        return maps[-1], maps[:-1]

    def decode(self, embed, high_res, coords, labels, mask_input=None) -> torch.Tensor:
        """Points (B, n, 2) in input pixels with SAM labels (1 pos, 0 neg, 2/3 box corners, -1 padding) and an
        optional (B, 1, h, w) mask-logit prompt -> low-res mask logits (B, 1, S/4, S/4)."""
        sam = self.sam
        pe = sam.sam_prompt_encoder
        if mask_input is not None and tuple(mask_input.shape[-2:]) != tuple(pe.mask_input_size):
            mask_input = F.interpolate(mask_input, size=pe.mask_input_size, mode="bilinear", align_corners=False)
        sparse, dense = pe(points=(coords, labels), boxes=None, masks=mask_input)
        low, _, _, _ = sam.sam_mask_decoder(
            image_embeddings=embed, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=False, repeat_image=False,
            high_res_features=high_res if sam.use_high_res_features_in_sam else None)
        return low

    @staticmethod
    def first_prompts(masks: np.ndarray, kinds: list[str], rng) -> tuple[np.ndarray, np.ndarray]:
        """Box (two corner points, labels 2/3) or one positive point inside each (B, S, S) mask -> (B, 2, 2), (B, 2)."""
        coords = np.zeros((len(masks), 2, 2), np.float32)
        labels = np.full((len(masks), 2), -1, np.int64)
        for i, (m, kind) in enumerate(zip(masks, kinds)):
            box = mask_to_box(m)
            if box is None:  # a small structure vanished at SAM2's input size: no prompt, and nothing to find
                continue
            if kind == "box":
                coords[i], labels[i] = [[box[0], box[1]], [box[2], box[3]]], [2, 3]
            else:  # a click inside the structure: the corrective click for an empty prediction
                pts, lab = sample_corrective_points(np.zeros_like(m), m, 1, rng)
                coords[i, :1], labels[i, :1] = pts, lab
        return coords, labels

    def forward(self, images: torch.Tensor, masks: torch.Tensor, kinds: list[str], rounds: int,
                points_per_round: int = 1, rng: np.random.Generator | None = None) -> list[torch.Tensor]:
        """Mask logits at input size (B, 1, S, S), one per round: the first prompt, then ``rounds`` rounds each
        adding corrective clicks from the previous prediction's errors (random interior points with ``rng``, the
        most interior ones without) with the previous low-res logits as the mask prompt."""
        s = images.shape[-1]
        embed, high_res = self.encode(images)
        true = masks.bool().cpu().numpy()
        c, lab = self.first_prompts(true, kinds, rng)
        coords = torch.as_tensor(c, device=images.device)
        labels = torch.as_tensor(lab, device=images.device)
        outputs, low = [], None
        for r in range(rounds + 1):
            if r:
                pred = (outputs[-1][:, 0] > 0).cpu().numpy()
                new_c = np.zeros((len(true), points_per_round, 2), np.float32)
                new_l = np.full((len(true), points_per_round), -1, np.int64)  # -1: no error left to click on
                for i in range(len(true)):
                    p, l_ = sample_corrective_points(pred[i], true[i], points_per_round, rng)
                    new_c[i, :len(p)], new_l[i, :len(l_)] = p, l_
                coords = torch.cat([coords, torch.as_tensor(new_c, device=images.device)], 1)
                labels = torch.cat([labels, torch.as_tensor(new_l, device=images.device)], 1)
            low = self.decode(embed, high_res, coords, labels, low)  # SAM2 feeds the previous logits, undetached
            outputs.append(F.interpolate(low, size=(s, s), mode="bilinear", align_corners=False))
        return outputs


class CBAMLoRASegTrainer(SegTrainer):
    """Mode cbam-lora: SAM2 + CBAM + LoRA, box/point prompt then interactive corrective rounds."""

    def __init__(self, cfg: SegJobConfig, device="cpu"):
        super().__init__(cfg, device)
        model_cfg = cfg.model_config()
        model_cfg.validate()
        torch.manual_seed(cfg.seed)  # the same CBAM init on every worker
        sam = add_cbam_lora(build_sam2_model(replace(model_cfg.sam2, device=str(self.device))), model_cfg.cbam_lora)
        self.model = PromptedSAM2(sam).to(self.device)
        self.transforms = predictor_for(sam)._transforms
        self.call = self.model
        self._make_optimizer()

    def parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def distribute(self, prepare) -> None:
        self.call = prepare(self.model)

    def set_train(self, on: bool) -> None:
        self.model.train(on)

    def _tensors(self, items):
        s = self.model.sam.image_size
        images = torch.stack([self.transforms(as_rgb_uint8(self.samples.get(it["manifest"], it["target"])[1]))
                              for it in items]).to(self.device)
        true = [self.samples.mask(it["manifest"], it["target"], it["structure"]) for it in items]
        return images, resize_masks(true, s, self.device), true

    def _kinds(self, n: int, rng) -> list[str]:
        kind = self.cfg.first_prompt
        if kind != "mixed":
            return [kind] * n
        if rng is None:
            return ["box"] * n  # validation: the box, reproducible
        return [("box", "point")[int(b)] for b in rng.integers(0, 2, n)]

    def losses(self, items, rng=None) -> dict[str, torch.Tensor]:
        images, masks, _ = self._tensors(items)
        outputs = self.call(images, masks, self._kinds(len(items), rng), self.cfg.interactive_rounds,
                            self.cfg.points_per_round, rng)
        parts = [focal_dice_loss(o, masks[:, None], self.cfg.focal_weight, self.cfg.dice_weight) for o in outputs]
        return {"loss": sum(p.loss for p in parts),  # summed over rounds, as SAM2's multi-step loss
                "focal": torch.stack([p.focal for p in parts]).mean().detach(),
                "dice": torch.stack([p.dice for p in parts]).mean().detach(),
                "dice_last_round": parts[-1].dice.detach()}

    @torch.no_grad()
    def _evaluate(self, items: list[dict]) -> dict[str, float]:
        """Sums of the Dice after the first prompt ("dice") and after the last corrective round
        ("dice_interactive", clicks at the error regions' centres), as inference runs SAM2 (eval mode); "dice_single":
        the first prompt's single-mask output, which the loss trains (see ``single_mask_output``); "n" items."""
        self.set_train(False)
        sums = {"dice": 0.0, "dice_interactive": 0.0, "dice_single": 0.0, "n": 0}
        for batch in self._batches(items):
            images, masks, true = self._tensors(batch)
            kinds = self._kinds(len(batch), None)
            outputs = self.model(images, masks, kinds, self.cfg.interactive_rounds, self.cfg.points_per_round, None)
            with single_mask_output(self.model.sam):
                single = self.model(images, masks, kinds, 0)[0]
            for i, mask in enumerate(true):
                d = dice_at(outputs[0][i, 0], mask)
                if not math.isnan(d):
                    sums["dice"] += d
                    sums["dice_interactive"] += dice_at(outputs[-1][i, 0], mask)
                    sums["dice_single"] += dice_at(single[i, 0], mask)
                    sums["n"] += 1
        return sums

    def weights(self) -> dict[str, torch.Tensor]:
        """What trains: LoRA, CBAM (+ the mask decoder), named as in the SAM2 model."""
        return {n: p.detach().cpu().contiguous() for n, p in self.model.sam.named_parameters() if p.requires_grad}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        check_keys(weights, self.weights())
        self.model.sam.load_state_dict(weights, strict=False)
