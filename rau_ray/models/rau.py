"""RAUModel: retrieval -> policy -> fusion/SAM2, composed. ``predict`` for one target, ``forward`` for training.

predict(target, structure): find a reference (the bank, or one given), ask the policy to segment the structure
with the reference's labelled boxes in the prompt, take the hidden state of its ``<Seg>`` token (when the answer
is malformed — a tiny random policy's always is — the canonical answer is teacher-forced so a mask still comes out,
and the format error is reported), encode the reference mask into SAM2 memory, decode the target's mask.
SAM2 image embeddings are cached by image hash, so prompts on the same image skip the encoder.
Use: ``model = RAUModel.build(get_profile("tiny"), bank_dir="banks/ct")`` (random/base weights) or
``RAUModel.from_checkpoint(policy="runs/train/grpo", segmenter="runs/train/seg", bank_dir="banks/ct")``;
``p = model.predict(image, "liver", modality="CT")`` -> label, box, mask, score, reference, reasoning, timings.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F

from rau_ray.data.manifest import ManifestRow, read_manifest
from rau_ray.data.tasks import label_boxes
from rau_ray.errors import ConfigError, DataError
from rau_ray.models import checkpoint as ckpt
from rau_ray.models import pipeline, prompts
from rau_ray.models.fusion import RAUSegmenter
from rau_ray.models.losses import dice_loss, focal_dice_loss  # noqa: F401  (dice_loss: re-exported)
from rau_ray.models.policy import load_policy
from rau_ray.models.profiles import ModelConfig
from rau_ray.models.reference import Reference, image_digest
from rau_ray.models.retrieval import Embedder, ReferenceBank
from rau_ray.models.sam2_builder import ImageEmbedding, build_sam2_model


@dataclass
class Prediction:
    structure: str
    label: str | None  # what the policy named (the structure when its answer was malformed)
    box: list[int] | None  # [x1, y1, x2, y2] in the target's pixels: the mask's tight box (None: empty mask)
    mask: np.ndarray | None  # (H, W) bool
    score: float  # SAM2's predicted IoU of the mask
    reference: dict | None  # the reference used (bank row id, similarity)
    reasoning: str  # the policy's raw completion
    format_error: str | None = None  # why the answer could not be parsed, if it could not
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    attention: np.ndarray | None = None  # the <Seg> query's attention over reference memory slots


class RAUModel:
    def __init__(self, cfg: ModelConfig, policy, segmenter: RAUSegmenter, embedder: Embedder | None = None,
                 bank: ReferenceBank | None = None):
        self.cfg, self.policy, self.segmenter, self.embedder, self.bank = cfg, policy, segmenter, embedder, bank
        self._embeddings: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._manifests: dict[str, object] = {}
        self.checkpoints: list[dict] = []  # provenance of the loaded checkpoints (from_checkpoint)

    @classmethod
    def build(cls, cfg: ModelConfig, bank_dir: str | None = None) -> RAUModel:
        cfg.validate()
        embedder = bank = None
        if bank_dir is not None:
            embedder = Embedder(cfg.retrieval)
            bank = ReferenceBank.load(bank_dir, embedder)
        segmenter = RAUSegmenter(build_sam2_model(cfg.sam2), cfg.fusion)
        return cls(cfg, load_policy(cfg.policy), segmenter, embedder, bank)

    @classmethod
    def from_checkpoint(cls, policy=None, segmenter=None, bank_dir: str | None = None, profile: str = "tiny",
                        device: str = "cpu") -> RAUModel:
        """The model training produced: ``policy`` an sft/grpo checkpoint (or run folder), ``segmenter`` a seg
        (mode rau) one; each rebuilt from the config it was trained with and loaded strictly (``models.checkpoint``).

        Without ``policy`` the policy is the one the segmenter trained with (its own adapter if it trained one);
        without ``segmenter`` the segmenter's projector and fusion are untrained. Either may be a path or a
        ``Checkpoint`` already read."""
        p = ckpt.read_checkpoint(policy) if isinstance(policy, (str, os.PathLike)) else policy
        s = ckpt.read_checkpoint(segmenter, kind="seg") if isinstance(segmenter, (str, os.PathLike)) else segmenter
        if p is not None and p.kind not in ("sft", "grpo"):
            raise ConfigError(f"{p.source}: a {p.kind} checkpoint, not a policy (sft or grpo) one")
        cfg = ckpt.combined_config(p, s, profile)
        cfg = replace(cfg, sam2=replace(cfg.sam2, device=str(device)))
        cfg.validate()
        the_policy = ckpt.load_policy_checkpoint(p or s, device, cfg) if (p or s) else load_policy(cfg.policy)
        if s is not None:
            seg = ckpt.load_segmenter_checkpoint(s, device)
        else:
            seg = RAUSegmenter(build_sam2_model(cfg.sam2), cfg.fusion).to(device).eval()
        embedder = bank = None
        if bank_dir is not None:
            embedder = Embedder(cfg.retrieval)
            bank = ReferenceBank.load(bank_dir, embedder)
        model = cls(cfg, the_policy, seg, embedder, bank)
        model.checkpoints = [c.describe() for c in (p, s) if c is not None]
        return model

    # -- pieces ---------------------------------------------------------------------------------------------------
    def image_embedding(self, image_u8: np.ndarray) -> ImageEmbedding:
        """SAM2's embedding of an image, computed once and kept in a small LRU cache keyed by the image's hash."""
        key = image_digest(image_u8)
        if key in self._embeddings:
            self._embeddings.move_to_end(key)
            return self._embeddings[key]
        emb = self.segmenter.set_image(image_u8)
        self._embeddings[key] = emb
        while len(self._embeddings) > self.cfg.embedding_cache:
            self._embeddings.popitem(last=False)
        return emb

    def retrieve(self, target: np.ndarray, modality: str, exclude_subject: str | None = None,
                 structure: str | None = None, k: int = 8) -> Reference:
        """The most similar bank entry; with ``structure``, the most similar of the ``k`` nearest that shows it
        (a reference after resection, or at another level, may lack the organ asked about)."""
        if self.bank is None:
            raise DataError("no reference given and no reference bank loaded (build one with `rau index build`)")
        query = self.embedder.embed([target], [modality])[0]
        result = self.bank.search(query, k=k if structure else 1, modality=modality, exclude_subject=exclude_subject,
                                  min_similarity=self.cfg.retrieval.min_similarity)
        if not result.hits:
            raise DataError(result.reason)
        for hit in result.hits:
            row = hit.row
            manifest = self._manifests.get(row["manifest"]) or read_manifest(row["manifest"])
            self._manifests[row["manifest"]] = manifest
            mrow = ManifestRow(**{k: v for k, v in row.items() if k in ManifestRow.__dataclass_fields__})
            image, label = manifest.load(mrow)
            values = [v for v, name in mrow.label_names.items() if name == structure]
            if structure is None or (values and (label == values[0]).any()):
                return Reference(image, label, mrow.label_names, mrow.modality, row, hit.similarity)
        raise DataError(f"none of the {len(result.hits)} most similar references shows {structure!r}")

    # -- inference ------------------------------------------------------------------------------------------------
    def predict(self, target: np.ndarray, structure: str, reference: Reference | None = None,
                modality: str = "CT") -> Prediction:
        return self.predict_many(target, [structure], reference, modality)[0]

    def predict_many(self, target: np.ndarray, structures: list[str], reference: Reference | None = None,
                     modality: str = "CT") -> list[Prediction]:
        """``predict`` for several structures of one target against one reference: one batched generation, the
        target's and the reference's SAM2 embeddings computed once. Without ``reference``, the bank's best hit that
        shows the first structure."""
        t: dict[str, float] = {}
        t0 = time.perf_counter()
        if reference is None:
            reference = self.retrieve(target, modality, structure=structures[0])
        t["retrieval"] = time.perf_counter() - t0
        by_name = {v: k for k, v in reference.names.items()}
        ref_masks = {}
        for structure in structures:
            if structure not in by_name:
                raise DataError(f"structure {structure!r} is not annotated in the reference; it has "
                                f"{', '.join(sorted(by_name))}")
            ref_masks[structure] = reference.label == by_name[structure]
            if not ref_masks[structure].any():
                raise DataError(f"structure {structure!r} has no pixels in the reference image")
        ref_boxes = label_boxes(reference.label, reference.names)
        questions = [pipeline.ask(self.policy.processor, "segment", target, reference.image, ref_boxes,
                                  structure=s, modality=modality, reference_modality=reference.modality)
                     for s in structures]
        t0 = time.perf_counter()
        completions = self.policy.generate([q.messages for q in questions], max_new_tokens=self.cfg.max_new_tokens)
        t["generate"] = (time.perf_counter() - t0) / len(structures)
        t0 = time.perf_counter()
        ref_emb = self.image_embedding(np.asarray(prompts.to_pil(reference.image, reference.modality)))
        tgt_emb = self.image_embedding(np.asarray(prompts.to_pil(target, modality)))
        t["embed"] = time.perf_counter() - t0
        ref_info = None if reference.row is None else {"id": reference.row["id"], "similarity": reference.similarity}
        out = []
        for structure, question, completion in zip(structures, questions, completions):
            timings = dict(t)
            parsed = question.parse(completion)
            t0 = time.perf_counter()
            seg_hidden = pipeline.seg_state(self.policy, question, completion)
            timings["seg_hidden"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            memory = self.segmenter.encode_reference(ref_emb, ref_masks[structure])
            logits, score, attn = self.segmenter.predict(tgt_emb, seg_hidden, memory)
            mask = (logits > 0).cpu().numpy()
            timings["decode"] = time.perf_counter() - t0
            # the mask's tight box (SAM2 delineates what the policy points at: held out, its IoU with the true box
            # is well above the written box's); None for an empty mask (SAM2 finds no object: absent)
            box = label_boxes(mask.astype(np.uint8), {1: "m"}).get("m")
            timings["total"] = sum(timings.values())
            out.append(Prediction(structure=structure, label=parsed.label if parsed else structure, box=box,
                                  mask=mask, score=score, reference=ref_info, reasoning=completion,
                                  format_error=None if parsed else parsed.message, timings=timings,
                                  attention=attn.float().cpu().numpy()))
        return out

    # -- training -------------------------------------------------------------------------------------------------
    def forward(self, batch: dict, mask_weight: float = 1.0, focal_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """Losses for a batch: ``messages``, ``completions`` (each with one <Seg>), ``target_images`` and
        ``ref_images`` (uint8), ``ref_masks`` and ``target_masks`` (bool). LM loss on the answers; focal + Dice
        on the masks decoded from the <Seg> hidden states."""
        inputs = self.policy.inputs_for(batch["messages"], batch["completions"])
        out = self.policy.model(**inputs, output_hidden_states=True)
        ids = inputs["input_ids"]
        seg_positions = [(ids[i] == self.policy.seg_token_id).nonzero().flatten()[-1] for i in range(len(ids))]
        last = out.hidden_states[-1]
        seg_hidden = torch.stack([last[i, p] for i, p in enumerate(seg_positions)])[:, None]
        seg = self.segmenter
        logits = seg(seg.images_to_tensor(batch["target_images"]), seg_hidden.float(),
                     seg.images_to_tensor(batch["ref_images"]),
                     torch.as_tensor(np.stack(batch["ref_masks"]), device=seg.device))
        size = logits.shape[-2:]
        target = F.interpolate(torch.as_tensor(np.stack(batch["target_masks"]), dtype=torch.float32,
                                               device=seg.device)[:, None], size=size, mode="nearest")
        mask_loss, focal, dice = focal_dice_loss(logits, target, focal_weight=focal_weight)
        return {"loss": out.loss + mask_weight * mask_loss, "lm_loss": out.loss.detach(),
                "focal": focal.detach(), "dice": dice.detach()}
