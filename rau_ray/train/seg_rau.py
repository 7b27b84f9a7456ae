"""Segmenter training, mode rau: the policy's ``<Seg>`` hidden state -> RAU's projector + memory fusion -> SAM2.

``RAUSegTrainer``: reference-target pairs; the policy (base, or the sft / grpo ``policy_checkpoint`` it will serve
with, checked by digest) answers each pair (the canonical answer teacher-forced, or its own greedy ``generated``
answer, cached) and its ``<Seg>`` state drives the ``RAUSegmenter``, whose projector, memory fusion and SAM2 mask
decoder train; ``train_policy_lora`` also trains the policy's LoRA with its answer LM loss.
``MemoryRefSegTrainer``: SAM2-Memory-Ref-SFT, the same pairs through SAM2's memory alone (no policy).
``with_policy_checkpoint(cfg)``: the driver's resolution of the policy checkpoint (path, digest, model section).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import replace

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from rau_ray.errors import ConfigError
from rau_ray.models.checkpoint import (
    POLICY_PREFIX,
    load_policy_checkpoint,
    locate_checkpoint,
    read_checkpoint,
    recorded_policy,
    weights_digest,
)
from rau_ray.models.fusion import RAUSegmenter
from rau_ray.models.losses import focal_dice_loss
from rau_ray.models.policy import load_policy
from rau_ray.models.profiles import get_profile
from rau_ray.models.sam2_builder import build_sam2_model
from rau_ray.train.policy_examples import PolicyExamples
from rau_ray.train.seg_base import SegJobConfig, SegTrainer, check_keys, dice_at, resize_masks, single_mask_output


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
        ref_masks = resize_masks([m(it, it["reference"]) for it in items], s, seg.device) > 0.5
        true = [m(it, it["target"]) for it in items]
        return targets, refs, ref_masks, true

    def losses(self, items, rng=None) -> dict[str, torch.Tensor]:
        targets, refs, ref_masks, true = self._tensors(items)
        hidden, lm_loss = self.seg_hidden(items)
        logits = self.seg_call(targets, hidden, refs, ref_masks)
        target = resize_masks(true, logits.shape[-1], logits.device)[:, None]
        loss, focal, dice = focal_dice_loss(logits, target, self.cfg.focal_weight, self.cfg.dice_weight)
        out = {"loss": loss, "focal": focal.detach(), "dice": dice.detach()}
        if lm_loss is not None:
            out["loss"] = loss + self.cfg.lm_weight * lm_loss
            out["lm_loss"] = lm_loss.detach()
        return out

    @torch.no_grad()
    def _evaluate(self, items: list[dict]) -> dict[str, float]:
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
                d = dice_at(logits[i, 0], mask)
                if not math.isnan(d):
                    sums["dice"] += d
                    sums["dice_single"] += dice_at(single[i, 0], mask)
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
        check_keys(seg, self.segmenter.trainable_state_dict())
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
    theirs = ck.model_config()
    if cfg.model.profile != theirs.profile:
        raise ConfigError(f"policy_checkpoint {cfg.policy_checkpoint} is a {theirs.profile}-profile policy, this "
                          f"job's model is the {cfg.model.profile} profile")
    if cfg.model.policy not in (get_profile(cfg.model.profile).policy, theirs.policy):
        raise ConfigError(f"model.policy and policy_checkpoint {cfg.policy_checkpoint} disagree: the policy "
                          "section comes from the checkpoint, leave it out")
    model = replace(cfg.model, policy=theirs.policy)
    model.validate()  # e.g. the fusion's width against the checkpoint policy's hidden size
    return replace(cfg, policy_checkpoint=where, policy_sha256=weights_digest(ck), model=model)
