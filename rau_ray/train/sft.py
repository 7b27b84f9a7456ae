"""Supervised fine-tuning of the policy on Ray Train: transformers' ``Trainer`` with DeepSpeed in every worker.

The driver builds reference-target task items from a manifest (``rau_ray.data.tasks.make_pairs``) and hands them to
Ray Data; each ``TorchTrainer`` worker reads its shard, builds the chat inputs with two images per sample (loss on
the answer only: ``Policy.inputs_for``) and trains the peft policy (LoRA + the ``<Seg>`` rows) with a
``transformers.Trainer`` over DeepSpeed (ZeRO-2 by default, ZeRO-3 also shards the frozen base weights; on CPU
workers through ``deepspeed.use_deepspeed_on_cpu``). As Ray Train's ``prepare_trainer`` does for Ray Data, the
Trainer's dataloader is the worker's own shard, never split over the ranks again. Every ``eval_every`` steps all
ranks answer their slice of the held-out items greedily and the scores are summed across ranks. A callback sends
the Trainer's logs to Ray Train with checkpoints (adapter + step + history); a restarted run resumes from the
latest, so the global step continues. Scale by changing ``scale.num_workers`` / ``scale.use_gpu``.
Use: ``rau train sft --config jobs/configs/sft-tiny.yaml`` or ``run_sft(SFTConfig(manifest=...))``.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field

import deepspeed
import ray.train
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from torch.utils.data import DataLoader
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from rau_ray.config import from_dict
from rau_ray.data.manifest import read_manifest
from rau_ray.data.tasks import make_pairs
from rau_ray.errors import ConfigError
from rau_ray.models.policy import load_policy
from rau_ray.models.profiles import ModelConfig
from rau_ray.models.retrieval import reference_picker
from rau_ray.scoring.answers import evaluate_policy, means
from rau_ray.train import run
from rau_ray.train.deepspeed import deepspeed_config, use_deepspeed_on_cpu
from rau_ray.train.policy_examples import PolicyExamples
from rau_ray.train.run import TrainJobConfig


@dataclass(frozen=True, kw_only=True)
class SFTConfig(TrainJobConfig):
    manifest: str  # the manifest: targets from `split`, references from its train split, held-out from `val_split`
    name: str = "sft"  # run name: the folder under scale.storage_path
    model: ModelConfig = field(default_factory=ModelConfig)  # YAML: a profile + overrides (models.profiles)
    split: str = "train"
    val_split: str = "val"  # other subjects than training: accuracy there is what generalises
    tasks: tuple[str, ...] = ("label", "ground", "all_boxes", "segment")
    zero_stage: int = 2  # DeepSpeed ZeRO: 2 shards optimizer state + gradients, 3 also the parameters
    batch_size: int = 4  # per worker and forward pass
    grad_accumulation: int = 1  # forward passes per optimizer step: a larger batch without its activations
    gradient_checkpointing: bool = False  # recompute activations in backward: off for tiny, on for the 7B
    lr: float = 2e-4  # LoRA's usual rate on a pretrained 7B; the tiny config raises it (random base, few steps)
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0: run the epochs out
    log_every: int = 10  # steps between metric reports (each is a sync of all workers)
    eval_every: int = 0  # steps between held-out evaluations; 0: only at the end
    eval_items: int = 24  # held-out items evaluated (split over the ranks); generation is the slow part
    max_new_tokens: int = 128  # for evaluation answers
    checkpoint_every: int = 100  # steps between checkpoints (the last step always saves)

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 1 or self.epochs < 1 or self.grad_accumulation < 1:
            raise ConfigError("batch_size, grad_accumulation and epochs must be at least 1")
        if self.zero_stage not in (2, 3):
            raise ConfigError(f"zero_stage must be 2 or 3, got {self.zero_stage}")
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise ConfigError("log_every and checkpoint_every must be at least 1")


def trainable_state(model, zero_stage: int) -> dict[str, torch.Tensor]:
    """The adapter (LoRA + trainable token rows) as plain tensors; under ZeRO-3 gathered from the shards."""
    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3):
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_trainable(model, weights: dict[str, torch.Tensor], zero_stage: int = 0) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=zero_stage == 3):
        set_peft_model_state_dict(model, weights)


def evaluate(policy, examples, items: list[dict], cfg: SFTConfig, rank: int, world: int) -> dict[str, float]:
    """Held-out scores summed over ranks: each rank answers an equal slice (ZeRO-3 generation runs in lockstep)."""
    per_rank = max(1, min(cfg.eval_items, len(items)) // world)
    # equal counts on every rank (sharded generation must run in lockstep): with fewer items than ranks, some repeat
    mine = [items[(rank * per_rank + i) % len(items)] for i in range(per_rank)]
    totals = evaluate_policy(policy, examples, mine, cfg.max_new_tokens, synced_gpus=cfg.zero_stage == 3 and world > 1)
    keys = ["n", "format", "accuracy"] + [f"{t}_{k}" for t in cfg.tasks for k in ("n", "format", "accuracy")]
    return {f"val_{k}": v for k, v in means(run.all_sum({k: totals.get(k, 0.0) for k in keys})).items()}


class ShardBatches(torch.utils.data.IterableDataset):
    """This worker's Ray Data shard as collated policy inputs, one forward pass each, endless (the Trainer stops
    at ``max_steps``); a resumed run skips the batches it trained on before. Counts the answer tokens it yields."""

    def __init__(self, shard, policy, batch_size: int, seed: int, skip: int):
        super().__init__()
        self.shard, self.policy, self.batch_size, self.seed, self.skip = shard, policy, batch_size, seed, skip
        self.examples = PolicyExamples(policy.processor)
        self.epoch, self.tokens = 0, 0

    def __iter__(self):
        for seen, (epoch, items) in enumerate(run.shard_batches(self.shard, self.batch_size, self.seed), 1):
            if seen <= self.skip:
                continue
            pairs = [self.examples.example(item) for item in items]
            inputs = self.policy.inputs_for([m for m, _ in pairs], [c for _, c in pairs])
            self.epoch = epoch
            self.tokens += int((inputs["labels"] != -100).sum())
            yield dict(inputs)


def _trainer(**kwargs):
    """A ``transformers.Trainer`` whose dataloader is the worker's own shard (Ray Train's ``prepare_trainer`` does
    the same for Ray Data iterables): accelerate must not split it over the ranks a second time."""
    class ShardTrainer(Trainer):
        def get_train_dataloader(self):
            return DataLoader(self.train_dataset, batch_size=None)  # batches come collated

    trainer = ShardTrainer(**kwargs)
    trainer.remove_callback(PrinterCallback)  # the logs go to Ray Train (and the run's history) instead
    return trainer


def _callback(cfg: SFTConfig, policy, batches: ShardBatches, config: dict, resumed, rank: int, world: int):
    """Trainer logs -> ``run.report`` on every worker, with throughput, memory and (every ``eval_every`` steps and
    at the end) held-out scores; at checkpoint steps and the last one, rank 0 also saves adapter, step, history."""
    history, start = resumed.history, resumed.step
    samples_per_step = cfg.batch_size * cfg.grad_accumulation * world

    class ReportToRay(TrainerCallback):
        def __init__(self):
            self.scores: dict[str, float] = {}
            self.rss: list[float] = []
            self.t0, self.eval_s, self.last_step = time.perf_counter(), 0.0, 0

        def report(self, metrics: dict, step: int, model=None) -> None:
            row = {"step": step, "resumed_from": start, **metrics}
            history.append(row)
            save = model is not None
            weights = trainable_state(model, cfg.zero_stage) if save else None
            run.report(row, weights=weights, step=step, history=history, config=config["cfg"])

        def on_train_begin(self, args, state, control, **kwargs):
            if start == 0 and cfg.eval_every:
                self.report(evaluate(policy, batches.examples, config["val_items"], cfg, rank, world), step=0)
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step, last = start + state.global_step, state.global_step >= state.max_steps
            self.rss.append(run.rss_mb())
            if step % cfg.checkpoint_every == 0 or last:
                control.should_log = True
            if cfg.eval_every and step % cfg.eval_every == 0 or last:
                t = time.perf_counter()
                self.scores = evaluate(policy, batches.examples, config["val_items"], cfg, rank, world)
                self.eval_s += time.perf_counter() - t
                control.should_log = True

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if not logs or "train_runtime" in logs:  # the end-of-training summary is not a step
                return
            step = start + state.global_step
            elapsed = time.perf_counter() - self.t0 - self.eval_s
            steps = state.global_step - self.last_step
            metrics = {"epoch": batches.epoch, "loss": float(logs["loss"]),
                       "grad_norm": float(logs.get("grad_norm", float("nan"))),
                       "samples_per_s": steps * samples_per_step / elapsed, "tokens_per_s": batches.tokens * world
                       / elapsed, "rss_mb": max(self.rss, default=run.rss_mb()), "peak_rss_mb": run.peak_rss_mb(),
                       **self.scores}
            metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
            save = step % cfg.checkpoint_every == 0 or state.global_step >= state.max_steps
            self.report(metrics, step, model if save else None)
            self.scores, self.rss, self.eval_s, self.last_step = {}, [], 0.0, state.global_step
            batches.tokens, self.t0 = 0, time.perf_counter()

    return ReportToRay()


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker; ``config``: "cfg" (SFTConfig as a dict), "val_items" (held-out task items),
    "total_steps" (where the run ends: max_steps, or the epochs' worth of this worker's shard)."""
    cfg = from_dict(SFTConfig, config["cfg"], "sft config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run.prepare_worker(cfg.scale)
    resumed = run.resume()
    if config["total_steps"] - resumed.step <= 0:
        return  # a finished run restarted: nothing left to do
    torch.manual_seed(cfg.seed)  # the same LoRA init on every worker
    # Loaded whole, then partitioned when DeepSpeed starts under ZeRO-3: peft sets up its trainable <Seg> rows on a
    # model loaded partitioned (zero.Init) only on CUDA. On CPU that costs nothing after the start (measured).
    policy = run.local_rank_zero_first(lambda: load_policy(cfg.model.policy))
    if resumed.weights is not None:
        load_trainable(policy.model, resumed.weights)
    if not cfg.scale.use_gpu:
        use_deepspeed_on_cpu()
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="rau-sft-"),  # nothing is saved there: Ray Train keeps checkpoints
        max_steps=config["total_steps"] - resumed.step, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accumulation, learning_rate=cfg.lr, weight_decay=0.0,
        lr_scheduler_type="constant",  # a resumed run continues at the same rate
        max_grad_norm=1.0, logging_steps=cfg.log_every, save_strategy="no", report_to=[], label_names=["labels"],
        seed=cfg.seed, bf16=cfg.scale.use_gpu, gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # LoRA: the frozen inputs need no grad
        deepspeed=deepspeed_config(cfg.zero_stage, cfg.batch_size, cfg.lr, bf16=cfg.scale.use_gpu,
                                   grad_accumulation=cfg.grad_accumulation, torch_adam=not cfg.scale.use_gpu),
        accelerator_config={"use_configured_state": True} if not cfg.scale.use_gpu else None,
        dataloader_num_workers=0, disable_tqdm=True)
    batches = ShardBatches(ray.train.get_dataset_shard("train"), policy, cfg.batch_size, cfg.seed,
                           skip=resumed.step * cfg.grad_accumulation)
    trainer = _trainer(model=policy.model, args=args, train_dataset=batches,
                       callbacks=[_callback(cfg, policy, batches, config, resumed, rank, world)])
    trainer.train()


def run_sft(cfg: SFTConfig):
    """Build task pairs, run the TorchTrainer, return Ray Train's Result (last metrics, checkpoint, path)."""
    cfg.validate()
    retrieval = cfg.model.retrieval
    manifest = read_manifest(cfg.manifest)
    # references retrieved by the profile's DINOv2 bank, as at inference
    retrieve = reference_picker(retrieval)
    items = make_pairs(manifest, split=cfg.split, tasks=cfg.tasks, seed=cfg.seed, retrieve=retrieve)
    val_items = make_pairs(manifest, split=cfg.val_split, tasks=cfg.tasks, seed=cfg.seed + 1,
                           retrieve=retrieve)[:cfg.eval_items]
    if not items:
        raise ConfigError(f"{cfg.manifest}: no reference-target pairs in split {cfg.split!r}")
    if not val_items:
        raise ConfigError(f"{cfg.manifest}: no held-out pairs in split {cfg.val_split!r}")
    per_worker = len(items) // cfg.scale.num_workers  # Ray Data's equal split of the shuffled items
    if per_worker == 0:
        raise ConfigError(f"{cfg.manifest}: {len(items)} training pairs cannot feed {cfg.scale.num_workers} workers")
    total_steps = cfg.epochs * math.ceil(per_worker / (cfg.batch_size * cfg.grad_accumulation))
    total_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    loop_config = {"cfg": asdict(cfg), "val_items": val_items, "total_steps": total_steps}
    return run.fit(train_loop_per_worker, loop_config, cfg.scale, cfg.name,
                   datasets={"train": run.materialized(items, cfg.seed)}, job=cfg)
