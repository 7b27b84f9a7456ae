"""Supervised fine-tuning of the policy on Ray Train + DeepSpeed: LoRA (and the ``<Seg>`` rows) on task pairs.

The driver builds reference-target task items from a manifest (``rau_ray.data.tasks.make_pairs``) and hands them to
Ray Data; each ``TorchTrainer`` worker streams its shard, builds the chat inputs with two images per sample (loss on
the answer only), and steps a DeepSpeed engine around the peft model (ZeRO-2 by default; ZeRO-3 also shards the
frozen base weights, loaded partitioned through transformers' DeepSpeed integration). Every ``eval_every`` steps
all ranks answer their slice of the held-out items greedily and the scores are summed across ranks. Checkpoints
(adapter + step + history) go to Ray Train; a restarted run resumes from the latest, so the global step continues.
Scale by changing ``scale.num_workers`` / ``scale.use_gpu``.
Use: ``rau train sft --config jobs/configs/sft-tiny.yaml`` or ``run_sft(SFTConfig(manifest=...))``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from rau_ray.errors import ConfigError
from rau_ray.train.run import ScaleConfig


@dataclass(frozen=True)
class SFTConfig:
    manifest: str  # the manifest: targets from `split`, references from its train split, held-out from `val_split`
    name: str = "sft"  # run name: the folder under scale.storage_path
    model: dict = field(default_factory=lambda: {"profile": "tiny"})  # profile + overrides (models.profiles)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    split: str = "train"
    val_split: str = "val"  # other subjects than training: accuracy there is what generalises
    tasks: tuple[str, ...] = ("label", "ground", "all_boxes", "segment")
    zero_stage: int = 2  # DeepSpeed ZeRO: 2 shards optimizer state + gradients, 3 also the parameters
    batch_size: int = 4  # per worker and step
    lr: float = 2e-4  # LoRA's usual rate on a pretrained 7B; the tiny config raises it (random base, few steps)
    epochs: int = 1
    max_steps: int = 0  # 0: run the epochs out
    log_every: int = 10  # steps between metric reports (each is a sync of all workers)
    eval_every: int = 0  # steps between held-out evaluations; 0: only at the end
    eval_items: int = 24  # held-out items evaluated (split over the ranks); generation is the slow part
    max_new_tokens: int = 128  # for evaluation answers
    checkpoint_every: int = 100  # steps between checkpoints (the last step always saves)
    seed: int = 0

    def validate(self) -> None:
        if self.batch_size < 1 or self.epochs < 1:
            raise ConfigError("batch_size and epochs must be at least 1")
        if self.zero_stage not in (2, 3):
            raise ConfigError(f"zero_stage must be 2 or 3, got {self.zero_stage}")
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise ConfigError("log_every and checkpoint_every must be at least 1")


def trainable_state(model, zero_stage: int) -> dict[str, torch.Tensor]:
    """The adapter (LoRA + trainable token rows) as plain tensors; under ZeRO-3 gathered from the shards."""
    import deepspeed
    from peft import get_peft_model_state_dict

    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3):
        return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_trainable(model, weights: dict[str, torch.Tensor], zero_stage: int = 0) -> None:
    import deepspeed
    from peft import set_peft_model_state_dict

    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=zero_stage == 3):
        set_peft_model_state_dict(model, weights)


def _all_sum(totals: dict[str, float], keys: list[str]) -> dict[str, float]:
    import torch.distributed as dist

    values = torch.tensor([float(totals.get(k, 0.0)) for k in keys], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return dict(zip(keys, values.tolist()))


def evaluate(policy, examples, items: list[dict], cfg: SFTConfig, rank: int, world: int) -> dict[str, float]:
    """Held-out scores summed over ranks: each rank answers an equal slice (ZeRO-3 generation runs in lockstep)."""
    from rau_ray.eval.policy_eval import evaluate_policy, means

    per_rank = max(1, min(cfg.eval_items, len(items)) // world)
    # equal counts on every rank (sharded generation must run in lockstep): with fewer items than ranks, some repeat
    mine = [items[(rank * per_rank + i) % len(items)] for i in range(per_rank)]
    totals = evaluate_policy(policy, examples, mine, cfg.max_new_tokens, synced_gpus=cfg.zero_stage == 3 and world > 1)
    keys = ["n", "format", "accuracy"] + [f"{t}_{k}" for t in cfg.tasks for k in ("n", "format", "accuracy")]
    return {f"val_{k}": v for k, v in means(_all_sum(totals, keys)).items()}


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker; ``config``: "cfg" (SFTConfig as a dict), "val_items" (held-out task items),
    "total_steps" (where the run ends: max_steps, or the epochs' worth of this worker's shard)."""
    import deepspeed
    import ray.train
    from transformers.integrations import HfDeepSpeedConfig

    from rau_ray.config import from_dict
    from rau_ray.models.policy import load_policy
    from rau_ray.models.profiles import model_config_from
    from rau_ray.train import run
    from rau_ray.train.deepspeed import deepspeed_config
    from rau_ray.train.policy_examples import PolicyExamples

    cfg = from_dict(SFTConfig, config["cfg"], "sft config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    ds_config = deepspeed_config(cfg.zero_stage, cfg.batch_size, cfg.lr, bf16=cfg.scale.use_gpu)
    run.pin_threads(cfg.scale)
    torch.manual_seed(cfg.seed)  # the same LoRA init on every worker
    # Loaded whole, then partitioned by deepspeed.initialize under ZeRO-3: peft's trainable <Seg> rows cannot be
    # set up on a model loaded partitioned except on CUDA (peft gathers them with a CUDA tensor).
    policy = run.local_rank_zero_first(lambda: load_policy(model_config_from(cfg.model).policy))
    hf_ds = HfDeepSpeedConfig(ds_config)  # noqa: F841 -- kept alive: ZeRO-3 generation runs ranks in lockstep
    resumed = run.resume()
    if resumed.weights is not None:
        load_trainable(policy.model, resumed.weights, cfg.zero_stage)
    step, history = resumed.step, resumed.history
    params = [p for p in policy.model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=policy.model, model_parameters=params, config=ds_config)
    examples = PolicyExamples(policy.processor)
    val_items = config["val_items"]
    shard = ray.train.get_dataset_shard("train")

    def log(metrics: dict, save: bool) -> None:
        row = {"step": step, "resumed_from": resumed.step, **metrics}
        history.append(row)
        weights = run_state() if save else None
        run.report(row, weights=weights, step=step, history=history, config=asdict(cfg))

    def run_state():
        return trainable_state(engine.module, cfg.zero_stage)

    if step == 0 and cfg.eval_every:
        log(evaluate(policy, examples, val_items, cfg, rank, world), save=False)
    seen, losses, rss, tokens, t0 = 0, [], [], 0, time.perf_counter()
    for epoch, items in run.shard_batches(shard, cfg.batch_size, cfg.seed):
        seen += 1
        if seen <= resumed.step:
            continue  # resumed: these batches were trained on before the restart
        pairs = [examples.example(item) for item in items]
        inputs = policy.inputs_for([m for m, _ in pairs], [c for _, c in pairs])
        loss = engine(**inputs).loss
        engine.backward(loss)
        engine.step()
        step += 1
        losses.append(float(loss.detach()))
        rss.append(run.rss_mb())
        tokens += int((inputs["labels"] != -100).sum())
        last = step >= config["total_steps"]
        if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or last:
            elapsed = time.perf_counter() - t0
            metrics = {"epoch": epoch, "loss": sum(losses) / len(losses),
                       "samples_per_s": len(losses) * cfg.batch_size * world / elapsed,
                       "tokens_per_s": tokens * world / elapsed, "rss_mb": max(rss), "peak_rss_mb": run.peak_rss_mb()}
            if cfg.eval_every and step % cfg.eval_every == 0 or last:
                metrics.update(evaluate(policy, examples, val_items, cfg, rank, world))
            log(metrics, save=step % cfg.checkpoint_every == 0 or last)
            losses, rss, tokens, t0 = [], [], 0, time.perf_counter()
        if last:
            break


def run_sft(cfg: SFTConfig):
    """Build task pairs, run the TorchTrainer, return Ray Train's Result (last metrics, checkpoint, path)."""
    from rau_ray.data.manifest import read_manifest
    from rau_ray.data.tasks import make_pairs
    from rau_ray.models.profiles import model_config_from
    from rau_ray.train import run

    cfg.validate()
    model_config_from(cfg.model, "sft config: model")  # a bad model section fails here, not in every worker
    manifest = read_manifest(cfg.manifest)
    items = make_pairs(manifest, split=cfg.split, tasks=cfg.tasks, seed=cfg.seed)
    val_items = make_pairs(manifest, split=cfg.val_split, tasks=cfg.tasks, seed=cfg.seed + 1)[:cfg.eval_items]
    if not items:
        raise ConfigError(f"{cfg.manifest}: no reference-target pairs in split {cfg.split!r}")
    if not val_items:
        raise ConfigError(f"{cfg.manifest}: no held-out pairs in split {cfg.val_split!r}")
    per_worker = len(items) // cfg.scale.num_workers  # Ray Data's equal split of the shuffled items
    if per_worker == 0:
        raise ConfigError(f"{cfg.manifest}: {len(items)} training pairs cannot feed {cfg.scale.num_workers} workers")
    total_steps = cfg.epochs * math.ceil(per_worker / cfg.batch_size)
    total_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    loop_config = {"cfg": asdict(cfg), "val_items": val_items, "total_steps": total_steps}
    return run.fit(train_loop_per_worker, loop_config, cfg.scale, cfg.name,
                   datasets={"train": run.materialized(items, cfg.seed)})
