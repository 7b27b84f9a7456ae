"""Segmenter training on Ray Train: RAU's fusion segmenter, or SpinalSAM-R1's CBAM-LoRA SAM2 with interactive clicks.

Mode ``rau``: reference-target pairs (``make_pairs`` with the segment task, expanded to every structure the two
share). The policy is frozen: the canonical segment answer is teacher-forced (as ``RAUModel.predict`` does when the
policy's own answer is malformed) and its ``<Seg>`` hidden state drives the ``RAUSegmenter``, whose projector, memory
fusion and SAM2 mask decoder train (SAM2's image and memory encoders stay frozen); ``train_policy_lora`` also trains
the policy's LoRA, with its answer LM loss. Mode ``cbam-lora``: single samples + structures; SAM2 with CBAM + LoRA
(``add_cbam_lora``) is prompted with a box (or a point) from the true mask, then for ``interactive_rounds`` rounds
with corrective clicks sampled from the error region of the previous prediction, the previous mask logits entering
as the mask prompt (SAM2's own interactive training); the loss is summed over rounds. Both modes: focal + Dice
(``focal_weight``:``dice_weight``), AdamW, DDP through ``ray.train.torch.prepare_model`` (gloo on CPU, NCCL on GPU).
Validation Dice (mean over the val split's sample/structure pairs, split over the ranks and all-reduced) is logged
at step 0 (the untrained start), every ``eval_every`` steps and at the end. Checkpoints (``rau_ray.train.run``):
the trainable parameters in ``weights.safetensors``, ``train_state.json`` {step, config}, ``history.jsonl``; a
resumed run continues the step. In-process (tests, notebooks): ``t = build_seg_trainer(cfg)``;
``t.train_step(items, rng)``; ``t.evaluate(items)``; ``seg_trainer_from_checkpoint(path)`` for a trained one.
Use: ``rau train seg --config jobs/configs/seg-tiny.yaml`` or ``run_seg(SegJobConfig(manifest=..., mode="rau"))``.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from rau_ray.config import from_dict
from rau_ray.data.manifest import Manifests, read_manifest
from rau_ray.data.tasks import label_boxes, make_pairs
from rau_ray.errors import ConfigError, DataError
from rau_ray.eval.metrics import dice, mask_to_box
from rau_ray.models.cbam_lora import add_cbam_lora
from rau_ray.models.checkpoint import (
    load_policy_checkpoint,
    locate_checkpoint,
    read_checkpoint,
    recorded_policy,
    weights_digest,
)
from rau_ray.models.fusion import RAUSegmenter
from rau_ray.models.losses import focal_dice_loss, sample_corrective_points
from rau_ray.models.policy import load_policy
from rau_ray.models.profiles import model_config_from
from rau_ray.models.prompts import to_pil
from rau_ray.models.retrieval import reference_picker
from rau_ray.models.sam2_builder import as_rgb_uint8, build_sam2_model, predictor_for
from rau_ray.train import run
from rau_ray.train.policy_examples import PolicyExamples
from rau_ray.train.run import ScaleConfig

MODES = ("rau", "cbam-lora", "memory-ref")
FIRST_PROMPTS = ("box", "point", "mixed")
ANSWERS = ("canonical", "generated")
POLICY_PREFIX = "policy."  # mode rau with train_policy_lora: the peft adapter's keys in weights.safetensors


@dataclass(frozen=True)
class SegJobConfig:
    manifest: str  # manifest.jsonl: `train_split` rows train, `val_split` rows give the validation Dice
    name: str = "seg"  # run name: the folder under scale.storage_path; the same name again resumes
    mode: str = "rau"  # "rau": <Seg> -> projector -> memory fusion -> SAM2 decoder; "cbam-lora": prompted SAM2;
    #                    "memory-ref": SAM2-Memory-Ref-SFT, the rau pairs through SAM2's memory alone (no policy)
    model: dict = field(default_factory=lambda: {"profile": "tiny"})  # profile + overrides (models.profiles)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    train_split: str = "train"
    val_split: str = "val"  # other subjects than training: the Dice there is what generalises
    eval_items: int = 256  # validation items at most (a seeded sample, split over the ranks); one forward each
    batch_size: int = 4  # samples per worker and step (the global batch is num_workers times this)
    lr: float = 1e-3  # AdamW; right for a tiny random SAM2 and a few hundred steps, fine-tuning a real one wants 1e-4
    grad_clip: float = 1.0  # max gradient norm: a fresh projector can spike the loss in its first steps
    focal_weight: float = 1.0  # focal : Dice is 1 : 1 in SpinalSAM-R1; SAM itself uses 20 : 1
    dice_weight: float = 1.0
    first_prompt: str = "box"  # cbam-lora: the first round's prompt from the true mask: box | point | mixed
    #                            (either, 50/50 per sample, as SAM2 trains; validation then uses the box)
    interactive_rounds: int = 2  # cbam-lora: corrective rounds after the first prompt (0: the prompt alone)
    points_per_round: int = 1  # cbam-lora: corrective clicks added per round (SAM2 adds one)
    train_mask_decoder: bool = True  # cbam-lora: fine-tune SAM2's mask decoder with CBAM + LoRA, as SpinalSAM-R1
    #                                  does (a random tiny decoder must learn); false keeps the decoder exact
    train_policy_lora: bool = False  # rau: also train the policy's LoRA (+<Seg> rows) through the mask loss
    lm_weight: float = 1.0  # rau with train_policy_lora: weight of the answer LM loss that keeps the policy talking
    max_steps: int = 200  # optimizer steps in all (the shard is cycled through as often as needed)
    log_every: int = 10  # steps between metric reports (each is a sync of all workers)
    eval_every: int = 50  # steps between validations; 0: only at the start and the end
    checkpoint_every: int = 100  # steps between checkpoints (the last step always saves)
    seed: int = 0  # data order, click sampling and the init of new layers (the same on every worker)
    structures: tuple[str, ...] = ()  # train and validate on these structures only (SpinalSAM-R1: vertebrae); all
    policy_checkpoint: str | None = None  # rau: the sft / grpo checkpoint whose <Seg> states the segmenter learns
    #                                       (the policy it will serve with); None: the profile's base policy
    answers: str = "canonical"  # rau: which answer's <Seg> state: "canonical" (teacher-forced) or "generated" (the
    #                             policy's own greedy answer, as at inference; the canonical one where it is malformed)
    policy_sha256: str = ""  # set by run_seg: the digest of policy_checkpoint's weights (what eval and serve check)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.first_prompt not in FIRST_PROMPTS:
            raise ConfigError(f"first_prompt must be one of {', '.join(FIRST_PROMPTS)}, got {self.first_prompt!r}")
        if min(self.batch_size, self.max_steps, self.log_every, self.checkpoint_every, self.points_per_round,
               self.eval_items) < 1:
            raise ConfigError("batch_size, max_steps, log_every, checkpoint_every, points_per_round and eval_items "
                              "must be at least 1")
        if self.interactive_rounds < 0 or self.eval_every < 0:
            raise ConfigError("interactive_rounds and eval_every must be >= 0")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ConfigError(f"lr and grad_clip must be > 0, got {self.lr} and {self.grad_clip}")
        if self.focal_weight < 0 or self.dice_weight < 0 or self.focal_weight + self.dice_weight == 0:
            raise ConfigError(f"focal_weight and dice_weight must be >= 0 and not both 0, got "
                              f"{self.focal_weight} and {self.dice_weight}")
        if self.train_policy_lora and self.mode != "rau":
            raise ConfigError(f"train_policy_lora applies to mode 'rau' only ({self.mode} has no policy)")
        if self.answers not in ANSWERS:
            raise ConfigError(f"answers must be one of {', '.join(ANSWERS)}, got {self.answers!r}")
        if self.mode != "rau" and (self.policy_checkpoint or self.answers != "canonical"):
            raise ConfigError(f"policy_checkpoint and answers apply to mode 'rau' only ({self.mode} has no policy)")
        if self.answers == "generated" and self.train_policy_lora:
            raise ConfigError("answers: generated needs a frozen policy (its answers are generated once and "
                              "cached); with train_policy_lora the canonical answer is trained")
        self.scale.validate()

    def model_config(self):
        """The ModelConfig this job trains (profile + the ``model`` overrides); cbam-lora's decoder as configured."""
        cfg = model_config_from(self.model, f"{self.name}: model")
        return replace(cfg, cbam_lora=replace(cfg.cbam_lora, train_mask_decoder=self.train_mask_decoder))


# -- data ------------------------------------------------------------------------------------------------------------
def seg_items(manifest, split: str, mode: str, seed: int = 0, reference_split: str = "train",
              retrieval=None) -> list[dict]:
    """Training/validation items as plain dicts (Ray Data rows), one per (sample, structure).

    ``rau``: ``make_pairs`` reference-target pairs (segment task), one item per structure annotated in both, with
    keys manifest, reference, target, structure (references retrieved by ``retrieval``'s embedder when given, as at
    inference). ``cbam-lora``: every row of ``split`` and each of its structures
    (reference None)."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    m = read_manifest(manifest) if isinstance(manifest, (str, Path)) else manifest
    path = str(m.path.resolve())
    rows = {r.id: r for r in m.rows}

    def present(row_id):
        return set(label_boxes(m.load(rows[row_id])[1], rows[row_id].label_names))

    items = []
    if mode in ("rau", "memory-ref"):
        seen = set()
        for pair in make_pairs(m, split=split, reference_split=reference_split, tasks=("segment",), seed=seed,
                               retrieve=reference_picker(retrieval) if retrieval is not None else None):
            if (pair["reference"], pair["target"]) in seen:
                continue
            seen.add((pair["reference"], pair["target"]))
            for s in sorted(present(pair["reference"]) & present(pair["target"])):
                items.append({"manifest": path, "reference": pair["reference"], "target": pair["target"],
                              "structure": s})
    else:
        for row in m.select(split=split):
            items += [{"manifest": path, "reference": None, "target": row.id, "structure": s}
                      for s in sorted(present(row.id))]
    return items


def job_items(cfg: SegJobConfig, manifest, split: str, seed: int) -> list[dict]:
    """``seg_items`` of the job's mode, kept to ``cfg.structures`` when it names any."""
    items = seg_items(manifest, split, cfg.mode, seed=seed, retrieval=cfg.model_config().retrieval)
    return [it for it in items if it["structure"] in cfg.structures] if cfg.structures else items


class Samples:
    """Reads manifest rows once per process: (row, (H, W, 3) uint8 image as SAM2 and the policy see it, label)."""

    def __init__(self, capacity: int = 512):
        self._manifests = Manifests()
        self._cache: OrderedDict = OrderedDict()
        self.capacity = capacity

    def get(self, manifest_path: str, row_id: str):
        key = (manifest_path, row_id)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        row, image, label = self._manifests.sample(manifest_path, row_id)
        value = np.asarray(to_pil(image, row.modality))
        self._cache[key] = (row, value, label)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return self._cache[key]

    def mask(self, manifest_path: str, row_id: str, structure: str) -> np.ndarray:
        row, _, label = self.get(manifest_path, row_id)
        by_name = {v: k for k, v in row.label_names.items()}
        if structure not in by_name:
            raise DataError(f"{manifest_path} [{row_id}]: no structure {structure!r}")
        return label == by_name[structure]


def _resize_masks(masks: list[np.ndarray], size: int, device) -> torch.Tensor:
    """Boolean (H, W) masks of any sizes -> (B, size, size) float 0/1 (nearest, as labels must be)."""
    return torch.cat([F.interpolate(torch.as_tensor(m, dtype=torch.float32, device=device)[None, None],
                                    size=(size, size), mode="nearest")[0] for m in masks])


def _dice_at(logits: torch.Tensor, mask: np.ndarray) -> float:
    """Dice of ``logits`` (h, w) brought to the true mask's size (bilinear, as SAM2 postprocesses) against it."""
    up = F.interpolate(logits[None, None].float(), size=mask.shape, mode="bilinear", align_corners=False)[0, 0]
    return dice((up > 0).cpu().numpy(), mask)


@contextmanager
def single_mask_output(sam):
    """SAM2's mask decoder without its eval-mode fallback: with ``multimask_output=False`` an evaluating SAM2.1 swaps
    in the best of its three multimask outputs whenever the single mask is unstable (logits near 0). The loss
    trains the single mask only, so early in training the swap picks untrained outputs; this measures the trained
    one."""
    decoder = sam.sam_mask_decoder
    saved = decoder.dynamic_multimask_via_stability
    decoder.dynamic_multimask_via_stability = False
    try:
        yield
    finally:
        decoder.dynamic_multimask_via_stability = saved


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


# -- trainers: the model pieces of one mode, usable in-process or inside a Ray Train worker -------------------------
class SegTrainer:
    """Common loop pieces: ``train_step(items, rng)``, ``evaluate(items)``, ``weights()`` / ``load_weights``,
    ``distribute(prepare_model)`` for DDP."""

    def __init__(self, cfg: SegJobConfig, device: torch.device | str = "cpu"):
        self.cfg, self.device = cfg, torch.device(device)
        self.samples = Samples()
        self.optimizer: torch.optim.Optimizer | None = None

    def parameters(self) -> list[torch.nn.Parameter]:
        raise NotImplementedError

    def _make_optimizer(self) -> None:
        params = self.parameters()
        if not params:
            raise ConfigError(f"mode {self.cfg.mode}: the model has no trainable parameters")
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=0.0)

    def train_step(self, items: list[dict], rng: np.random.Generator | None = None) -> dict[str, float]:
        self.set_train(True)
        out = self.losses(items, rng)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        return {k: float(v.detach()) for k, v in out.items()}

    @torch.no_grad()
    def fixed_losses(self, items: list[dict]) -> dict[str, float]:
        """The training losses on ``items`` without a step, with the clicks fixed (the error regions' centres):
        the same number before and after training tells whether the optimizer lowers the loss."""
        self.set_train(True)  # as the optimizer sees it (SAM2's eval mode may swap in a multimask output)
        return {k: float(v) for k, v in self.losses(items, None).items()}

    def _batches(self, items):
        for i in range(0, len(items), self.cfg.batch_size):
            yield items[i:i + self.cfg.batch_size]


class RAUSegTrainer(SegTrainer):
    """Mode rau: frozen policy (teacher-forced canonical segment answer) -> <Seg> hidden -> RAUSegmenter."""

    def __init__(self, cfg: SegJobConfig, device="cpu"):
        super().__init__(cfg, device)
        model_cfg = cfg.model_config()
        model_cfg.validate()
        torch.manual_seed(cfg.seed)  # the same LoRA on every worker (DDP broadcasts rank 0's when it trains)
        self.policy = trained_policy(cfg, self.device, model_cfg) if cfg.policy_checkpoint else load_policy(
            model_cfg.policy)
        torch.manual_seed(cfg.seed)  # the same new layers whether or not the tiny policy was just built
        self.policy.model.to(self.device)
        if not cfg.train_policy_lora:
            self.policy.model.requires_grad_(False)
            self.policy.model.eval()  # no LoRA dropout: the <Seg> state of an item is fixed, so it is cached
        self.segmenter = RAUSegmenter(build_sam2_model(replace(model_cfg.sam2, device=str(self.device))),
                                      model_cfg.fusion).to(self.device)
        self.examples = PolicyExamples(self.policy.processor)
        self.max_new_tokens = model_cfg.max_new_tokens
        self._hidden: OrderedDict = OrderedDict()
        self.seg_call, self.policy_call = self.segmenter, self.policy.model  # replaced by their DDP wrappers
        self._make_optimizer()

    def parameters(self):
        params = [p for p in self.segmenter.parameters() if p.requires_grad]
        if self.cfg.train_policy_lora:
            params += [p for p in self.policy.model.parameters() if p.requires_grad]
        return params

    def distribute(self, prepare) -> None:
        """Wrap the trained modules for DDP (``prepare`` is ``ray.train.torch.prepare_model``-like)."""
        self.seg_call = prepare(self.segmenter)
        if self.cfg.train_policy_lora:
            self.policy_call = prepare(self.policy.model)

    def set_train(self, on: bool) -> None:
        self.segmenter.train(on)
        if self.cfg.train_policy_lora:
            self.policy.model.train(on)

    def _policy_inputs(self, items):
        """The policy's inputs for the items' segment answers: canonical, or its own greedy ones (``answers``)."""
        questions = [self.examples.question({**it, "task": "segment"})[0] for it in items]
        if self.cfg.answers == "generated":
            generated = self.policy.generate([q.messages for q in questions], max_new_tokens=self.max_new_tokens)
            completions = [q.forced(c) for q, c in zip(questions, generated)]
        else:
            completions = [q.forced("") for q in questions]
        return self.policy.inputs_for([q.messages for q in questions], completions)

    def _seg_hidden_states(self, inputs, out) -> torch.Tensor:
        ids = inputs["input_ids"]
        last = out.hidden_states[-1]
        pos = [(ids[i] == self.policy.seg_token_id).nonzero().flatten()[-1] for i in range(len(ids))]
        return torch.stack([last[i, p] for i, p in enumerate(pos)])[:, None].float()  # (B, 1, hidden)

    def seg_hidden(self, items) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, 1, hidden) <Seg> states and, when the policy trains, its answer LM loss."""
        if self.cfg.train_policy_lora and torch.is_grad_enabled():
            inputs = self._policy_inputs(items)
            out = self.policy_call(**inputs, output_hidden_states=True)
            return self._seg_hidden_states(inputs, out), out.loss
        keys = [(it["manifest"], it["reference"], it["target"], it["structure"]) for it in items]
        missing = [it for it, k in zip(items, keys) if k not in self._hidden]
        if missing:
            with torch.no_grad():
                inputs = self._policy_inputs(missing)
                out = self.policy.model(**inputs, output_hidden_states=True)
                states = self._seg_hidden_states(inputs, out)
            for it, h in zip(missing, states):
                self._hidden[(it["manifest"], it["reference"], it["target"], it["structure"])] = h
        if self.cfg.train_policy_lora:  # evaluating a training policy: its states change, do not keep them
            states = torch.stack([self._hidden.pop(k) for k in keys])
        else:
            states = torch.stack([self._hidden[k] for k in keys])
            while len(self._hidden) > 4096:
                self._hidden.popitem(last=False)
        return states, None

    def _tensors(self, items):
        seg = self.segmenter
        s = seg.sam.image_size
        m = lambda it, rid: self.samples.mask(it["manifest"], rid, it["structure"])  # noqa: E731
        targets = seg.images_to_tensor([self.samples.get(it["manifest"], it["target"])[1] for it in items])
        refs = seg.images_to_tensor([self.samples.get(it["manifest"], it["reference"])[1] for it in items])
        ref_masks = _resize_masks([m(it, it["reference"]) for it in items], s, seg.device) > 0.5
        true = [m(it, it["target"]) for it in items]
        return targets, refs, ref_masks, true

    def losses(self, items, rng=None) -> dict[str, torch.Tensor]:
        targets, refs, ref_masks, true = self._tensors(items)
        hidden, lm_loss = self.seg_hidden(items)
        logits = self.seg_call(targets, hidden, refs, ref_masks)
        target = _resize_masks(true, logits.shape[-1], logits.device)[:, None]
        loss, focal, dice = focal_dice_loss(logits, target, self.cfg.focal_weight, self.cfg.dice_weight)
        out = {"loss": loss, "focal": focal.detach(), "dice": dice.detach()}
        if lm_loss is not None:
            out["loss"] = loss + self.cfg.lm_weight * lm_loss
            out["lm_loss"] = lm_loss.detach()
        return out

    @torch.no_grad()
    def evaluate(self, items: list[dict]) -> dict[str, float]:
        """Sums over ``items`` of the Dice of the thresholded mask at the target's size: "dice" as inference runs
        SAM2 (eval mode), "dice_single" from the single-mask output the loss trains (see ``single_mask_output``);
        "n" items."""
        self.set_train(False)
        sums = {"dice": 0.0, "dice_single": 0.0, "n": 0}
        for batch in self._batches(items):
            targets, refs, ref_masks, true = self._tensors(batch)
            hidden, _ = self.seg_hidden(batch)
            logits = self.segmenter(targets, hidden, refs, ref_masks)
            with single_mask_output(self.segmenter.sam):
                single = self.segmenter(targets, hidden, refs, ref_masks)
            for i, mask in enumerate(true):
                d = _dice_at(logits[i, 0], mask)
                if not math.isnan(d):
                    sums["dice"] += d
                    sums["dice_single"] += _dice_at(single[i, 0], mask)
                    sums["n"] += 1
        return sums

    def weights(self) -> dict[str, torch.Tensor]:
        """What trains: the segmenter's projector, fusion and decoder (+ the policy adapter, prefixed)."""
        weights = self.segmenter.trainable_state_dict()
        if self.cfg.train_policy_lora:
            weights.update({POLICY_PREFIX + k: v.detach().cpu().contiguous()
                            for k, v in get_peft_model_state_dict(self.policy.model).items()})
        return weights

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        seg = {k: v for k, v in weights.items() if not k.startswith(POLICY_PREFIX)}
        _check_keys(seg, self.segmenter.trainable_state_dict())
        self.segmenter.load_state_dict(seg, strict=False)
        adapter = {k[len(POLICY_PREFIX):]: v for k, v in weights.items() if k.startswith(POLICY_PREFIX)}
        if adapter:
            set_peft_model_state_dict(self.policy.model, adapter)
        self._hidden.clear()


class MemoryRefSegTrainer(RAUSegTrainer):
    """Mode memory-ref, the SAM2-Memory-Ref-SFT baseline: the rau pairs and losses through SAM2's memory alone (the
    reference memory conditions the target's features; no policy, no <Seg> query); SAM2's mask decoder trains."""

    def __init__(self, cfg: SegJobConfig, device="cpu"):
        SegTrainer.__init__(self, cfg, device)
        model_cfg = cfg.model_config()
        model_cfg.validate()
        torch.manual_seed(cfg.seed)
        self.segmenter = RAUSegmenter(build_sam2_model(replace(model_cfg.sam2, device=str(self.device))),
                                      model_cfg.fusion).memory_only().to(self.device)
        self.seg_call = self.segmenter
        self._hidden: OrderedDict = OrderedDict()
        self._make_optimizer()

    def seg_hidden(self, items):
        return None, None


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
        return images, _resize_masks(true, s, self.device), true

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
    def evaluate(self, items: list[dict]) -> dict[str, float]:
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
                d = _dice_at(outputs[0][i, 0], mask)
                if not math.isnan(d):
                    sums["dice"] += d
                    sums["dice_interactive"] += _dice_at(outputs[-1][i, 0], mask)
                    sums["dice_single"] += _dice_at(single[i, 0], mask)
                    sums["n"] += 1
        return sums

    def weights(self) -> dict[str, torch.Tensor]:
        """What trains: LoRA, CBAM (+ the mask decoder), named as in the SAM2 model."""
        return {n: p.detach().cpu().contiguous() for n, p in self.model.sam.named_parameters() if p.requires_grad}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        _check_keys(weights, self.weights())
        self.model.sam.load_state_dict(weights, strict=False)


def trained_policy(cfg: SegJobConfig, device, model_cfg):
    """The policy of ``cfg.policy_checkpoint``, checked against the digest the driver recorded (a checkpoint
    replaced between the driver and the workers would train a segmenter on another policy)."""
    return load_policy_checkpoint(recorded_policy(cfg.policy_checkpoint, cfg.policy_sha256 or None, cfg.name),
                                  device, model_cfg)


def with_policy_checkpoint(cfg: SegJobConfig) -> SegJobConfig:
    """``cfg`` with its policy checkpoint resolved (an absolute path or a URI), its digest recorded and the model
    section's policy taken from that checkpoint (the rest as the job gives it); a ConfigError when it is no policy
    checkpoint or another profile's."""
    if not cfg.policy_checkpoint:
        return cfg
    where = locate_checkpoint(cfg.policy_checkpoint)
    ck = read_checkpoint(where)
    if ck.kind not in ("sft", "grpo"):
        raise ConfigError(f"policy_checkpoint {cfg.policy_checkpoint}: a {ck.kind} checkpoint, not a policy "
                          "(sft / grpo) one")
    mine, theirs = cfg.model.get("profile", "tiny"), ck.model_section.get("profile", "tiny")
    if mine != theirs:
        raise ConfigError(f"policy_checkpoint {cfg.policy_checkpoint} is a {theirs}-profile policy, this job's "
                          f"model is the {mine} profile")
    if "policy" in cfg.model and cfg.model["policy"] != ck.model_section.get("policy", cfg.model["policy"]):
        raise ConfigError(f"model.policy and policy_checkpoint {cfg.policy_checkpoint} disagree: the policy "
                          "section comes from the checkpoint, leave it out")
    model = {**cfg.model, **({"policy": ck.model_section["policy"]} if "policy" in ck.model_section else {})}
    return replace(cfg, policy_checkpoint=where, policy_sha256=weights_digest(ck), model=model)


def _check_keys(weights: dict, expected: dict) -> None:
    if set(weights) != set(expected):
        differ = sorted(set(weights) ^ set(expected))
        raise DataError(f"checkpoint weights do not match this model ({len(differ)} names differ, e.g. "
                        f"{differ[0]!r}); was it saved with another mode or model config?")


def build_seg_trainer(cfg: SegJobConfig, device="cpu") -> SegTrainer:
    cfg.validate()
    return {"rau": RAUSegTrainer, "cbam-lora": CBAMLoRASegTrainer, "memory-ref": MemoryRefSegTrainer}[cfg.mode](
        cfg, device)


def seg_trainer_from_checkpoint(folder: str | Path, device="cpu") -> SegTrainer:
    """The trainer (models included) a checkpoint was saved from, with its trained weights: its ``segmenter``
    (mode rau) or ``model.sam`` (cbam-lora) is the trained model."""
    weights, state = run.read_checkpoint(folder)
    trainer = build_seg_trainer(from_dict(SegJobConfig, state["config"], f"{folder}/train_state.json"), device)
    trainer.load_weights(weights)
    return trainer


# -- Ray Train -------------------------------------------------------------------------------------------------------
def _all_sum(values: dict[str, float], device) -> dict[str, float]:
    """Sum over the ranks (the process group Ray Train set up), or as is in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker; ``config``: "cfg" (SegJobConfig as a dict), "val_items" (validation items)."""
    cfg = from_dict(SegJobConfig, config["cfg"], "seg config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.scale.use_gpu else torch.device("cpu")
    run.prepare_worker(cfg.scale)
    trainer = run.local_rank_zero_first(lambda: build_seg_trainer(cfg, device))  # tiny models built once per node
    resumed = run.resume()
    if resumed.weights is not None:
        trainer.load_weights(resumed.weights)
    step, history = resumed.step, resumed.history
    # SAM2's decoder computes IoU / multimask / object-score heads that the mask loss never reaches
    trainer.distribute(lambda m: ray.train.torch.prepare_model(
        m, parallel_strategy_kwargs={"find_unused_parameters": True}))
    val_items = config["val_items"][rank::world]

    def validate() -> dict:
        sums = _all_sum(trainer.evaluate(val_items), device)
        n = sums.pop("n")
        out = {f"val_{k}": v / n if n else float("nan") for k, v in sums.items()}
        start = next((row["val_dice"] for row in history if "val_dice" in row), out["val_dice"])
        return {**out, "val_dice_start": start}

    def log(metrics: dict, save: bool) -> None:
        row = {"step": step, "resumed_from": resumed.step, **metrics}
        history.append(row)
        run.report(row, weights=trainer.weights() if save else None, step=step, history=history,
                   config=asdict(cfg))

    if step == 0 and config["val_items"]:
        log(validate(), save=False)  # the untrained start
    shard = ray.train.get_dataset_shard("train")
    rng = np.random.default_rng([cfg.seed, rank, step])  # corrective clicks; a resumed run draws new ones
    sums: dict[str, float] = {}
    seen, count, t0 = 0, 0, time.perf_counter()
    if step < cfg.max_steps:
        for epoch, batch in run.shard_batches(shard, cfg.batch_size, cfg.seed):
            seen += 1
            if seen <= resumed.step:
                continue  # resumed: these batches were trained on before the restart
            metrics = trainer.train_step(batch, rng)
            step += 1
            count += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
            last = step >= cfg.max_steps
            evaluate = bool(config["val_items"]) and ((cfg.eval_every and step % cfg.eval_every == 0) or last)
            save = step % cfg.checkpoint_every == 0 or last
            if step % cfg.log_every == 0 or evaluate or save:
                row = {"epoch": epoch, **{k: v / count for k, v in sums.items()},
                       "samples_per_s": count * cfg.batch_size * world / (time.perf_counter() - t0)}
                if evaluate:
                    row.update(validate())
                log(row, save=save)
                sums, count, t0 = {}, 0, time.perf_counter()
            if last:
                break


def run_seg(cfg: SegJobConfig):
    """Build the items, run the TorchTrainer, return Ray Train's Result (last metrics with val_dice, checkpoint)."""
    cfg.validate()
    cfg = with_policy_checkpoint(cfg)
    cfg.model_config()  # a bad model section fails here, not in every worker
    manifest = read_manifest(cfg.manifest)
    items = job_items(cfg, manifest, cfg.train_split, cfg.seed)
    if len(items) < cfg.scale.num_workers:
        raise ConfigError(f"{cfg.manifest}: {len(items)} training items in split {cfg.train_split!r} cannot feed "
                          f"{cfg.scale.num_workers} workers")
    val_items = []
    if cfg.val_split:
        val_items = job_items(cfg, manifest, cfg.val_split, cfg.seed + 1)
        if not val_items:
            raise ConfigError(f"{cfg.manifest}: no validation items in split {cfg.val_split!r} (val_split: '' "
                              "trains without validation)")
        order = np.random.default_rng(cfg.seed).permutation(len(val_items))[:cfg.eval_items]
        val_items = [val_items[i] for i in sorted(order)]
    return run.fit(train_loop_per_worker, {"cfg": asdict(cfg), "val_items": val_items}, cfg.scale, cfg.name,
                   datasets={"train": run.materialized(items, cfg.seed)})
