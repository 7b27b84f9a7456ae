"""Pretrain SAM2-tiny on Ray Train the way SAM2 is trained: prompts, corrective clicks, and memory on short clips.

Every step has two halves, summed into one loss so that DDP sees the whole model each step:
- *images*: a batch of (image, one structure) from generic scenes and the train-split phantom subjects; the first
  prompt is a (jittered) box or a click inside the structure, then ``rounds`` corrective rounds add a click from
  the largest error region of the previous prediction with its logits as the mask prompt (SAM2's interactive
  training). Losses as SAM2 weights them: focal 20 : Dice 1 on the single-mask output every round, the best of the
  three multimask outputs after the first prompt, IoU-head MSE on all four, object-score BCE.
- *memory*: two-frame clips, a frame with its mask (the conditioning frame, as ``add_new_mask``) then a frame
  segmented from memory alone through SAM2's own ``track_step`` (memory attention over the encoded memory, the
  multimask output chosen by the IoU head, as the video predictor runs it). Clips: the same subject's nearby slice
  (3D propagation), another subject's slice of the same level (SAM2-Memory-Ref), a scene and the same scene moved;
  a structure missing from the second frame (a resected organ) trains the object score to say "absent".
Validation (every ``eval_every`` steps, split over the ranks): box Dice and memory Dice on ct-abdomen subjects of
``VAL_SEED`` (neither a training nor the benchmark seed). The export is a safetensors state dict that
``rau_ray.models.sam2_builder`` loads into ``build_sam2``'s model (SAM2's release ``.pt`` is a pickle).
Use: ``rau pretrain sam2 --config jobs/configs/pretrain-sam2-tiny.yaml``; ``quality(cfg)`` for the held-out figures.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision.ops import sigmoid_focal_loss

from rau_ray.config import from_dict
from rau_ray.data.phantoms import PHANTOMS, ct_abdomen, xray_angio
from rau_ray.data.scenes import make_scene, random_affine, random_spec, render, scene_rng
from rau_ray.errors import ConfigError
from rau_ray.models import pretrained, sam2_builder
from rau_ray.models.checkpoint import read_weights_and_state
from rau_ray.models.losses import sample_corrective_points
from rau_ray.models.memory_ref import memory_ref_baseline
from rau_ray.models.pretrained import weights_root
from rau_ray.models.prompts import to_pil
from rau_ray.models.sam2_builder import (
    TINY,
    build_sam2_model,
    build_video_predictor,
    embed_image,
    predict_with_prompts,
    predictor_for,
)
from rau_ray.scoring.metrics import dice, mask_to_box
from rau_ray.train import pretrain, run
from rau_ray.train.pretrain import BENCHMARK_SEED, PretrainData, export, phantom_train_subjects
from rau_ray.train.run import TrainJobConfig

VAL_SEED = 4242  # validation subjects during training: not a training seed, not the benchmark's
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # SAM2's transforms
SOURCES = ("ct", "angio", "scene")


@dataclass(frozen=True, kw_only=True)
class Sam2PretrainConfig(TrainJobConfig):
    name: str = "pretrain-sam2-tiny"  # run folder under scale.storage_path; the same name again resumes
    out: str = "weights/tiny/sam2"  # where the final weights are exported (what the tiny profile loads)
    data: PretrainData = field(default_factory=PretrainData)
    sam2: dict = field(default_factory=dict)  # overrides of the tiny Sam2Config (image_size, widths...)
    mix: tuple[float, float, float] = (0.55, 0.1, 0.35)  # image half: share of ct / angio / scene samples
    batch_size: int = 8  # image samples per worker and step
    clip_batch: int = 4  # memory clips per worker and step (0: no memory training)
    rounds: int = 2  # corrective rounds after the first prompt
    p_box: float = 0.5  # the first prompt is a box with this probability, else a click
    box_jitter: float = 0.05  # box corners moved by N(0, this x side), as SAM trains for imprecise boxes
    lr: float = 1e-3  # AdamW, linear warm-up then cosine to lr * min_lr_ratio
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    focal_weight: float = 20.0  # SAM2's loss weights: mask (focal) 20, Dice 1, IoU 1, object score 1
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    score_weight: float = 1.0
    max_steps: int = 3000
    log_every: int = 25
    eval_every: int = 250
    checkpoint_every: int = 250
    val_subjects: int = 6  # VAL_SEED ct-abdomen subjects for the validation curves

    def validate(self) -> None:
        super().validate()
        self.data.validate()
        if len(self.mix) != 3 or min(self.mix) < 0 or sum(self.mix) <= 0:
            raise ConfigError(f"mix: three shares >= 0 (ct, angio, scene), got {self.mix}")
        for share, phantom in zip(self.mix, ("ct-abdomen", "xray-angio")):
            if share > 0 and phantom not in self.data.phantoms:
                raise ConfigError(f"mix gives {phantom} samples a share of {share}, but data.phantoms lacks {phantom}")
        if min(self.batch_size, self.max_steps, self.val_subjects) < 1:
            raise ConfigError("batch_size, max_steps and val_subjects must be >= 1")
        if min(self.clip_batch, self.rounds, self.eval_every, self.warmup_steps) < 0:
            raise ConfigError("clip_batch, rounds, eval_every and warmup_steps must be >= 0")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.p_box <= 1:
            raise ConfigError("lr must be > 0, min_lr_ratio and p_box within [0, 1]")
        self.sam2_config()

    def sam2_config(self):
        """The tiny Sam2Config this run trains: random init, the data's image size unless overridden."""
        base = {**asdict(TINY), "init": "random", "seed": self.seed, **self.sam2}
        cfg = from_dict(type(TINY), base, f"{self.name}: sam2")
        if cfg.checkpoint != "tiny":
            raise ConfigError("sam2.checkpoint: pretraining builds the tiny SAM2 (checkpoint: tiny)")
        return cfg


# -- data ------------------------------------------------------------------------------------------------------------
@dataclass
class Frame:
    image: np.ndarray  # (S, S) uint8
    label: np.ndarray  # (S, S) uint8 label map
    names: dict  # label value -> structure name
    subject: int = -1
    slice: int = -1


def ct_frames(seed: int, subjects, size: int, slices_per_subject: int) -> list[Frame]:
    """Axial slices of ct-abdomen subjects, windowed (abdomen) to uint8 as SAM2 sees them."""
    lo, hi = ct_abdomen.axial_range()
    frames = []
    for s in subjects:
        p = ct_abdomen.draw_subject(seed, s)
        for k in np.linspace(lo, hi, slices_per_subject).round().astype(int):
            image, label = ct_abdomen.render_slice(p, seed, s, int(k), size)
            frames.append(Frame(np.asarray(to_pil(image, "CT"))[..., 0], label, ct_abdomen.LABELS, s, int(k)))
    return frames


def angio_frames(seed: int, subjects, size: int) -> list[Frame]:
    return [Frame(np.asarray(x.image, np.uint8), x.label, x.labels, s) for s in subjects
            for x in xray_angio.generate_2d(seed, s, size=size)]


class Sampler:
    """A worker's training data: phantom frames made once, scenes drawn on the fly, both augmented per draw."""

    def __init__(self, cfg: Sam2PretrainConfig, size: int):
        self.cfg, self.size = cfg, size
        subjects = phantom_train_subjects(cfg.data)
        self.ct = ct_frames(cfg.data.seed, subjects.get("ct-abdomen", []), size, 16) if cfg.mix[0] else []
        self.angio = angio_frames(cfg.data.seed, subjects.get("xray-angio", []), size) if cfg.mix[1] else []
        self.by_subject: dict[int, list[int]] = {}
        for i, f in enumerate(self.ct):
            self.by_subject.setdefault(f.subject, []).append(i)

    @staticmethod
    def _jitter(image: np.ndarray, rng) -> np.ndarray:
        gain, bias, noise = rng.uniform(0.8, 1.2), rng.uniform(-20, 20), rng.uniform(0, 6)
        out = image.astype(np.float32) * gain + bias + rng.normal(0, noise, image.shape)
        return np.clip(out, 0, 255).astype(np.uint8)

    def _structure(self, label: np.ndarray, rng, min_px: int = 12) -> np.ndarray | None:
        values, counts = np.unique(label[label > 0], return_counts=True)
        values = values[counts >= min_px]
        return None if not len(values) else label == values[int(rng.integers(len(values)))]

    def image_sample(self, rng) -> tuple[np.ndarray, np.ndarray]:
        source = SOURCES[int(rng.choice(3, p=np.asarray(self.cfg.mix) / sum(self.cfg.mix)))]
        while True:
            if source == "scene":
                scene = make_scene(self.cfg.data.seed, int(rng.integers(self.cfg.data.scenes)), self.size)
                image, label = scene.image, scene.label
            else:
                pool = self.ct if source == "ct" else self.angio
                frame = pool[int(rng.integers(len(pool)))]
                image, label = self._jitter(frame.image, rng), frame.label
            mask = self._structure(label, rng)
            if mask is not None:
                return image, mask

    def clip_sample(self, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(frame 0, its mask, frame 1, the same structure's mask there, possibly empty)."""
        kind = rng.choice(3, p=[0.35, 0.35, 0.3]) if self.ct else 2
        if kind == 2:
            spec = random_spec(scene_rng(self.cfg.data.seed, int(rng.integers(self.cfg.data.scenes))))
            a, b = render(spec, self.size), render(spec, self.size, random_affine(rng))
            la, lb = a.label, np.zeros_like(a.label)
            # the moved scene numbers its visible shapes anew: map them back by their spec order
            for sa in a.shapes:
                match = [sb for sb in b.shapes if (sb.kind, sb.tone) == (sa.kind, sa.tone)]
                if len(match) == 1:
                    lb[b.label == match[0].label] = sa.label
            ia, ib = a.image, b.image
        else:
            f0 = self.ct[int(rng.integers(len(self.ct)))]
            if kind == 0:  # the same subject a few slices away: 3D propagation
                near = [i for i in self.by_subject[f0.subject] if 0 < abs(self.ct[i].slice - f0.slice) <= 6]
            else:  # another subject at the same level: SAM2-Memory-Ref
                near = [i for i, f in enumerate(self.ct) if f.subject != f0.subject and abs(f.slice - f0.slice) <= 3]
            if not near:
                return self.clip_sample(rng)
            f1 = self.ct[near[int(rng.integers(len(near)))]]
            ia, ib, la, lb = self._jitter(f0.image, rng), self._jitter(f1.image, rng), f0.label, f1.label
        values, counts = np.unique(la[la > 0], return_counts=True)
        values = values[counts >= 12]
        if not len(values):
            return self.clip_sample(rng)
        v = values[int(rng.integers(len(values)))]
        return ia, la == v, ib, lb == v


def to_tensor(images: list[np.ndarray], size: int, device="cpu") -> torch.Tensor:
    """(H, W) uint8 images -> (B, 3, size, size) normalised as SAM2's transforms do."""
    x = torch.stack([torch.as_tensor(np.asarray(im), dtype=torch.float32) for im in images])[:, None] / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).to(device)


def masks_tensor(masks: list[np.ndarray], size: int, device="cpu") -> torch.Tensor:
    m = torch.stack([torch.as_tensor(np.asarray(x), dtype=torch.float32) for x in masks])[:, None]
    if m.shape[-1] != size:
        m = F.interpolate(m, size=(size, size), mode="nearest")
    return m.to(device)


# -- the model pieces ------------------------------------------------------------------------------------------------
class Sam2Pretrainer(torch.nn.Module):
    """SAM2Base plus the two training forwards; ``forward(batch, clips, rng)`` returns the loss terms."""

    def __init__(self, sam, cfg: Sam2PretrainConfig):
        super().__init__()
        self.sam, self.cfg = sam, cfg

    # image encoder as SAM2ImagePredictor runs it (no memory: the no-memory embedding added)
    def encode(self, images: torch.Tensor):
        sam = self.sam
        backbone = sam.forward_image(images)
        _, feats, pos, sizes = sam._prepare_backbone_features(backbone)
        return backbone, feats, pos, sizes

    def _maps(self, feats, sizes, b):
        return [f.permute(1, 2, 0).reshape(b, -1, *hw) for f, hw in zip(feats, sizes)]

    def decode_all(self, embed, high_res, coords, labels, mask_input=None):
        """All four masks (B, 4, S/4, S/4), their IoU predictions (B, 4) and object-score logits (B, 1)."""
        sam = self.sam
        pe = sam.sam_prompt_encoder
        if mask_input is not None and tuple(mask_input.shape[-2:]) != tuple(pe.mask_input_size):
            mask_input = F.interpolate(mask_input, size=pe.mask_input_size, mode="bilinear", align_corners=False)
        sparse, dense = pe(points=(coords, labels), boxes=None, masks=mask_input)
        masks, ious, _, scores = sam.sam_mask_decoder.predict_masks(
            image_embeddings=embed, image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, repeat_image=False, high_res_features=high_res)
        return masks, ious, scores

    def _mask_terms(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample focal*w + Dice*w of (B, M, h, w) logits against (B, 1, h, w) targets -> (B, M)."""
        t = target.expand_as(logits)
        focal = sigmoid_focal_loss(logits, t, alpha=0.25, gamma=2.0, reduction="none").flatten(2).mean(-1)
        p = logits.sigmoid().flatten(2)
        tt = t.flatten(2)
        dice = 1 - (2 * (p * tt).sum(-1) + 1) / (p.sum(-1) + tt.sum(-1) + 1)
        return self.cfg.focal_weight * focal + self.cfg.dice_weight * dice

    @staticmethod
    def _iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = (logits > 0).flatten(2).float()
        t = target.expand_as(logits).flatten(2)
        inter, union = (pred * t).sum(-1), ((pred + t) > 0).float().sum(-1)
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))

    def _head_terms(self, logits, ious_pred, target) -> torch.Tensor:
        return self.cfg.iou_weight * F.mse_loss(ious_pred, self._iou(logits.detach(), target))

    def image_losses(self, images: torch.Tensor, masks: torch.Tensor, rng) -> dict[str, torch.Tensor]:
        sam, cfg = self.sam, self.cfg
        b, s = images.shape[0], images.shape[-1]
        _, feats, _, sizes = self.encode(images)
        feats = list(feats)
        feats[-1] = feats[-1] + sam.no_mem_embed
        maps = self._maps(feats, sizes, b)
        embed, high_res = maps[-1], maps[:-1]
        low_size = s // 4
        target = F.interpolate(masks, size=(low_size, low_size), mode="area")
        target = (target > 0.5).float()
        true = masks[:, 0].bool().cpu().numpy()
        coords = np.zeros((b, 2, 2), np.float32)
        labels = np.full((b, 2), -1, np.int64)
        for i in range(b):
            if rng.random() < cfg.p_box:
                x0, y0, x1, y1 = mask_to_box(true[i])
                w, h = x1 - x0 + 1, y1 - y0 + 1
                j = rng.normal(0, cfg.box_jitter, 4) * [w, h, w, h]
                coords[i] = np.clip([[x0 + j[0], y0 + j[1]], [x1 + j[2], y1 + j[3]]], 0, s - 1)
                labels[i] = [2, 3]
            else:
                p, lab = sample_corrective_points(np.zeros_like(true[i]), true[i], 1, rng)
                coords[i, :1], labels[i, :1] = p, lab
        c = torch.as_tensor(coords, device=images.device)
        lab_t = torch.as_tensor(labels, device=images.device)
        total = mask = multi = head = torch.zeros((), device=images.device)
        prev = None
        for r in range(cfg.rounds + 1):
            if r:
                pred = (F.interpolate(prev.detach(), size=(s, s), mode="bilinear", align_corners=False)[:, 0] > 0)
                pred = pred.cpu().numpy()
                nc, nl = np.zeros((b, 1, 2), np.float32), np.full((b, 1), -1, np.int64)
                for i in range(b):
                    p, lab = sample_corrective_points(pred[i], true[i], 1, rng)
                    nc[i, :len(p)], nl[i, :len(lab)] = p, lab
                c = torch.cat([c, torch.as_tensor(nc, device=images.device)], 1)
                lab_t = torch.cat([lab_t, torch.as_tensor(nl, device=images.device)], 1)
            logits, ious, scores = self.decode_all(embed, high_res, c, lab_t, prev)
            terms = self._mask_terms(logits, target)  # (B, 4)
            mask = mask + terms[:, 0].mean()
            if r == 0:  # ambiguous first prompt: the best of the three multimask outputs (SAM's min-loss)
                multi = terms[:, 1:].min(1).values.mean()
            head = head + self._head_terms(logits, ious, target)
            head = head + cfg.score_weight * F.binary_cross_entropy_with_logits(scores, torch.ones_like(scores))
            prev = logits[:, :1]
        total = (mask + multi + head) / (cfg.rounds + 1)
        return {"loss": total, "img_mask": mask.detach() / (cfg.rounds + 1), "img_multi": multi.detach(),
                "img_heads": head.detach() / (cfg.rounds + 1)}

    def memory_losses(self, ref: torch.Tensor, ref_mask: torch.Tensor, tgt: torch.Tensor,
                      tgt_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frame 0 conditioned by its mask, frame 1 from memory alone, through SAM2's ``track_step``."""
        sam, cfg = self.sam, self.cfg
        b, s = ref.shape[0], ref.shape[-1]
        backbone = sam.forward_image(torch.cat([ref, tgt]))
        _, feats, pos, sizes = sam._prepare_backbone_features(backbone)
        frame = lambda xs, i: [x[:, i * b:(i + 1) * b] for x in xs]  # noqa: E731  (HW, 2B, C) -> frame i
        output = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        out0 = sam.track_step(frame_idx=0, is_init_cond_frame=True, current_vision_feats=frame(feats, 0),
                              current_vision_pos_embeds=frame(pos, 0), feat_sizes=sizes, point_inputs=None,
                              mask_inputs=ref_mask, output_dict=output, num_frames=2, run_mem_encoder=True)
        output["cond_frame_outputs"][0] = out0
        _, outs, _, _ = sam._track_step(1, False, frame(feats, 1), frame(pos, 1), sizes, None, None, output, 2,
                                        False, None)
        low_multi, _, ious, _, _, _, scores = outs
        low = s // 4
        target = (F.interpolate(tgt_mask, size=(low, low), mode="area") > 0.5).float()
        present = (tgt_mask.flatten(1).sum(1) > 0).float()
        terms = self._mask_terms(low_multi, target)  # (B, M): the multimask outputs of a tracked frame
        best = terms.min(1).values
        mask = (best * present).sum() / present.sum().clamp(min=1)
        head = self._head_terms(low_multi, ious, target)
        score = cfg.score_weight * F.binary_cross_entropy_with_logits(scores[:, 0], present)
        return {"loss": mask + head + score, "mem_mask": mask.detach(), "mem_score": score.detach()}

    def forward(self, images, masks, clips, rng):
        out = self.image_losses(images, masks, rng)
        if clips is not None:
            mem = self.memory_losses(*clips)
            out = {**out, **mem, "loss": out["loss"] + mem["loss"]}
        return out


# -- validation: the inference paths' numbers, computed batched --------------------------------------------------------
def val_items(cfg: Sam2PretrainConfig, size: int) -> tuple[list, list]:
    """(box items, memory pairs) on VAL_SEED ct-abdomen subjects: (frame, structure value) and (ref, tgt, value)."""
    frames = ct_frames(VAL_SEED, range(cfg.val_subjects), size, 4)
    boxes = [(f, int(v)) for f in frames for v in np.unique(f.label[f.label > 0])]
    pairs = []
    for f in frames:
        others = [g for g in frames if g.subject != f.subject and g.slice == f.slice]
        if others:
            g = others[0]
            pairs += [(f, g, int(v)) for v in np.unique(f.label[f.label > 0]) if (g.label == v).any()]
    return boxes, pairs


@torch.no_grad()
def validate(model: Sam2Pretrainer, boxes, pairs, batch: int = 16) -> dict[str, float]:
    """Sums: box Dice (single-mask output as SAM2ImagePredictor gives it) and memory Dice, with counts."""
    sam = model.sam
    s = sam.image_size
    was = model.training
    model.eval()
    out = {"box_dice": 0.0, "box_n": 0.0, "mem_dice": 0.0, "mem_n": 0.0}
    for i in range(0, len(boxes), batch):
        chunk = boxes[i:i + batch]
        images = to_tensor([f.image for f, _ in chunk], s)
        _, feats, _, sizes = model.encode(images)
        feats = list(feats)
        feats[-1] = feats[-1] + sam.no_mem_embed
        maps = model._maps(feats, sizes, len(chunk))
        scale = s / chunk[0][0].image.shape[0]
        coords = torch.tensor([[[b[0], b[1]], [b[2], b[3]]] for b in
                               (np.asarray(mask_to_box(f.label == v), float) * scale for f, v in chunk)],
                              dtype=torch.float32)
        labels = torch.tensor([[2, 3]] * len(chunk))
        pe = sam.sam_prompt_encoder
        sparse, dense = pe(points=(coords, labels), boxes=None, masks=None)
        low, _, _, _ = sam.sam_mask_decoder(image_embeddings=maps[-1], image_pe=pe.get_dense_pe(),
                                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                            multimask_output=False, repeat_image=False, high_res_features=maps[:-1])
        for (f, v), lg in zip(chunk, low):
            up = F.interpolate(lg[None], size=f.label.shape, mode="bilinear", align_corners=False)[0, 0]
            out["box_dice"] += dice((up > 0).numpy(), f.label == v)
            out["box_n"] += 1
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        ref = to_tensor([f.image for f, _, _ in chunk], s)
        tgt = to_tensor([g.image for _, g, _ in chunk], s)
        ref_mask = masks_tensor([f.label == v for f, _, v in chunk], s)
        backbone = sam.forward_image(torch.cat([ref, tgt]))
        _, feats, pos, sizes = sam._prepare_backbone_features(backbone)
        b = len(chunk)
        frame = lambda xs, j: [x[:, j * b:(j + 1) * b] for x in xs]  # noqa: B023, E731
        output = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        output["cond_frame_outputs"][0] = sam.track_step(0, True, frame(feats, 0), frame(pos, 0), sizes, None,
                                                         ref_mask, output, 2, run_mem_encoder=True)
        out1 = sam.track_step(1, False, frame(feats, 1), frame(pos, 1), sizes, None, None, output, 2,
                              run_mem_encoder=False)
        for (_, g, v), lg in zip(chunk, out1["pred_masks"]):
            up = F.interpolate(lg[None], size=g.label.shape, mode="bilinear", align_corners=False)[0, 0]
            out["mem_dice"] += dice((up > 0).numpy(), g.label == v)
            out["mem_n"] += 1
    model.train(was)
    return out


def lr_at(cfg: Sam2PretrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def build(cfg: Sam2PretrainConfig, device="cpu") -> Sam2Pretrainer:
    torch.manual_seed(cfg.seed)
    sam = build_sam2_model(replace(cfg.sam2_config(), device=str(device)))
    return Sam2Pretrainer(sam, cfg).to(device)


def step_batch(cfg: Sam2PretrainConfig, sampler: Sampler, rng, size: int, device="cpu"):
    imgs, masks = zip(*(sampler.image_sample(rng) for _ in range(cfg.batch_size)))
    images, m = to_tensor(list(imgs), size, device), masks_tensor(list(masks), size, device)
    clips = None
    if cfg.clip_batch:
        ia, ma, ib, mb = zip(*(sampler.clip_sample(rng) for _ in range(cfg.clip_batch)))
        clips = (to_tensor(list(ia), size, device), masks_tensor(list(ma), size, device),
                 to_tensor(list(ib), size, device), masks_tensor(list(mb), size, device))
    return images, m, clips


def train_loop_per_worker(config: dict) -> None:
    cfg = from_dict(Sam2PretrainConfig, config["cfg"], "pretrain-sam2 config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scale.use_gpu else torch.device("cpu")
    run.prepare_worker(cfg.scale)
    model = build(cfg, device)
    size = model.sam.image_size
    resumed = run.resume()
    if resumed.weights is not None:
        model.sam.load_state_dict(resumed.weights)
    step, history = resumed.step, resumed.history
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    sampler = Sampler(cfg, size)
    boxes, pairs = val_items(cfg, size)
    boxes, pairs = boxes[rank::world], pairs[rank::world]

    def val() -> dict:
        sums = run.all_sum(validate(model, boxes, pairs), device)
        return {"val_box_dice": sums["box_dice"] / max(sums["box_n"], 1),
                "val_mem_dice": sums["mem_dice"] / max(sums["mem_n"], 1)}

    def log(row: dict, save: bool) -> None:
        row = {"step": step, "resumed_from": resumed.step, **row}
        history.append(row)
        weights = {k: v.detach().cpu() for k, v in model.sam.state_dict().items()} if save else None
        run.report(row, weights=weights, step=step, history=history, config=asdict(cfg))

    if step == 0:
        log(val(), save=False)
    rng = np.random.default_rng([cfg.seed, rank, step])
    sums, count, t0 = {}, 0, time.perf_counter()
    while step < cfg.max_steps:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(cfg, step)
        images, masks, clips = step_batch(cfg, sampler, rng, size, device)
        out = ddp(images, masks, clips, rng)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1
        count += 1
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        last = step >= cfg.max_steps
        evaluate = (cfg.eval_every and step % cfg.eval_every == 0) or last
        save = step % cfg.checkpoint_every == 0 or last
        if step % cfg.log_every == 0 or evaluate or save:
            row = {**{k: v / count for k, v in sums.items()}, "lr": lr_at(cfg, step - 1),
                   "s_per_step": (time.perf_counter() - t0) / count}
            if evaluate:
                row.update(val())
            log(row, save=save)
            sums, count, t0 = {}, 0, time.perf_counter()


def run_pretrain_sam2(cfg: Sam2PretrainConfig):
    """Train on Ray Train, then export the last checkpoint's weights to ``cfg.out``; returns Ray Train's Result."""
    cfg.validate()
    started = time.time()
    result = run.fit(train_loop_per_worker, {"cfg": asdict(cfg)}, cfg.scale, cfg.name, job=cfg)
    if result.error is None and result.checkpoint:
        weights, _ = read_weights_and_state(result.checkpoint.path)
        export_sam2(cfg, weights, pretrain.job_facts(cfg, result, OBJECTIVE, started))
    return result


OBJECTIVE = ("promptable segmentation (jittered boxes or a click, then corrective clicks from the error region with "
             "the previous logits as mask prompt) + memory on two-frame clips (mask-conditioned frame, then a frame "
             "from memory alone); focal 20 : Dice 1 : IoU-head MSE 1 : object-score BCE 1, as SAM2")


def export_sam2(cfg: Sam2PretrainConfig, weights: dict, facts: dict):
    """The state dict as ``model.safetensors`` + the architecture spec, atomically into ``cfg.out``."""
    scfg = cfg.sam2_config()

    def write(folder):
        save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"),
                  metadata={"format": "pt", "sam2_config": scfg.config})
        (folder / pretrained.SPEC_FILE).write_text(json.dumps(sam2_builder.tiny_spec(scfg), sort_keys=True,
                                                              indent=1))

    return export(out_path(cfg.out), write, facts)


def out_path(out: str):
    """``out`` as given when absolute, else relative to the checkout (where ``weights/`` lives)."""
    p = Path(out)
    return p if p.is_absolute() else weights_root().parents[1] / p


# -- held-out quality: the inference code paths, on subjects no run saw ------------------------------------------------
def quality(sam2_cfg=None, seed: int = BENCHMARK_SEED, subjects: int = 12, size: int = 192, clicks: int = 3,
            memory_pairs: int = 60, boot: int = 2000, model=None, ood_subjects: int = 6) -> dict:
    """Held-out figures of a SAM2 (the shipped tiny one by default) through SAM2ImagePredictor and the video
    predictor: box Dice per ct-abdomen structure and on vertebrae, Dice after 1 + (clicks - 1) corrective clicks,
    memory propagation reference -> target (SAM2-Memory-Ref; another subject at the same level), box Dice on the
    never-trained ultrasound and xray-msk phantoms. Means with 95 % bootstrap intervals over subjects. ``model``: an
    already built SAM2Base (e.g. a CBAM-LoRA one) measured on the single-image figures only."""
    sam2_cfg = sam2_cfg or TINY
    image_only = model is not None
    model = model if image_only else build_sam2_model(sam2_cfg)
    predictor = predictor_for(model)
    records: dict[str, list[tuple[int, float]]] = {}

    def add(key, subject, value):
        records.setdefault(key, []).append((subject, float(value)))

    def samples(name, n):
        ph = PHANTOMS[name]
        for s in range(n):
            for x in ph.generate_2d(seed, s, size=size):
                yield s, np.asarray(to_pil(x.image, x.modality))[..., 0], x.label, x.labels

    ct = list(samples("ct-abdomen", subjects))
    for s, image, label, names in ct:
        emb = embed_image(predictor, image)
        for v, name in names.items():
            true = label == v
            if not true.any():
                continue
            masks, _, _ = predict_with_prompts(predictor, emb, box=np.asarray(mask_to_box(true), float))
            d = dice(masks[0] > 0, true)
            add("ct_box", s, d)
            if name == "vertebrae":
                add("vertebrae_box", s, d)
            pts, labs, logits = np.zeros((0, 2), np.float32), np.zeros(0, np.int64), None
            pred = np.zeros_like(true)
            for _ in range(clicks):  # SAM2's protocol: each click at the centre of the largest error region
                p, lab = sample_corrective_points(pred, true, 1)
                if not len(p):
                    break
                pts, labs = np.concatenate([pts, p]), np.concatenate([labs, lab])
                predictor._features, predictor._orig_hw, predictor._is_image_set = emb.features, [emb.orig_hw], True
                masks, _, low = predictor.predict(point_coords=pts, point_labels=labs, multimask_output=False,
                                                  mask_input=logits)
                pred, logits = masks[0] > 0, low
            add(f"ct_{clicks}_clicks", s, dice(pred, true))
    if image_only:
        return {key: summarise(vals, boot, seed) for key, vals in records.items()} | {
            "seed": seed, "subjects": subjects, "size": size}
    video = build_video_predictor(sam2_cfg)
    by_subject = {}
    for i, (s, *_rest) in enumerate(ct):
        by_subject.setdefault(s, []).append(i)
    rng = np.random.default_rng(seed)
    done = 0
    for i in rng.permutation(len(ct)):
        if done >= memory_pairs:
            break
        s, image, label, names = ct[i]
        j = by_subject[(s + 1) % subjects][i - by_subject[s][0]]  # the next subject, same stratum
        _, image2, label2, _ = ct[j]
        shared = [v for v in names if (label == v).sum() >= 12 and (label2 == v).any()]
        if not shared:
            continue
        v = shared[int(rng.integers(len(shared)))]
        pred = memory_ref_baseline(video, image, label == v, image2)
        add("memory_ref", s, dice(pred, label2 == v))
        done += 1
    for name in ("ultrasound", "xray-msk"):
        for s, image, label, names in samples(name, ood_subjects):
            emb = embed_image(predictor, image)
            for v in names:
                if (label == v).any():
                    masks, _, _ = predict_with_prompts(predictor, emb, box=np.asarray(mask_to_box(label == v), float))
                    add(f"{name}_box", s, dice(masks[0] > 0, label == v))
    return {key: summarise(vals, boot, seed) for key, vals in records.items()} | {
        "seed": seed, "subjects": subjects, "size": size}


def summarise(values: list[tuple[int, float]], boot: int = 2000, seed: int = 0) -> dict:
    """Mean, n and a 95 % bootstrap interval resampling subjects (items of one subject move together)."""
    by: dict[int, list[float]] = {}
    for s, v in values:
        by.setdefault(s, []).append(v)
    groups = list(by.values())
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(boot):
        pick = [groups[i] for i in rng.integers(len(groups), size=len(groups))]
        flat = [v for g in pick for v in g]
        means.append(np.mean(flat))
    flat = [v for _, v in values]
    return {"mean": round(float(np.mean(flat)), 4), "n": len(flat), "subjects": len(groups),
            "ci95": [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]}
