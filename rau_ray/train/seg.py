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

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch

from rau_ray.config import from_dict
from rau_ray.data.manifest import read_manifest
from rau_ray.errors import ConfigError
from rau_ray.models.checkpoint import read_weights_and_state
from rau_ray.train import run
from rau_ray.train.seg_base import SegJobConfig, SegTrainer, job_items
from rau_ray.train.seg_cbam import CBAMLoRASegTrainer
from rau_ray.train.seg_rau import MemoryRefSegTrainer, RAUSegTrainer, with_policy_checkpoint


def build_seg_trainer(cfg: SegJobConfig, device="cpu") -> SegTrainer:
    """The trainer of ``cfg.mode`` (its models built, fresh trainable parts)."""
    cfg.validate()
    return {"rau": RAUSegTrainer, "cbam-lora": CBAMLoRASegTrainer, "memory-ref": MemoryRefSegTrainer}[cfg.mode](
        cfg, device)


def seg_trainer_from_checkpoint(folder: str | Path, device="cpu") -> SegTrainer:
    """The trainer (models included) a checkpoint was saved from, with its trained weights: its ``segmenter``
    (mode rau) or ``model.sam`` (cbam-lora) is the trained model."""
    weights, state = read_weights_and_state(folder)
    trainer = build_seg_trainer(from_dict(SegJobConfig, state["config"], f"{folder}/train_state.json"), device)
    trainer.load_weights(weights)
    return trainer


# -- Ray Train -------------------------------------------------------------------------------------------------------
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
        sums = run.all_sum(trainer.evaluate(val_items), device)
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
                   datasets={"train": run.materialized(items, cfg.seed)}, job=cfg)
