"""GRPO of the policy on Ray Train: trl's ``GRPOTrainer`` in every worker, starting from the SFT adapter.

The driver builds reference-target task items from a manifest (as SFT does) and hands them to every worker; trl's
sampler repeats each prompt ``num_generations`` times and accelerate splits every generation batch over the
workers, so each worker samples the rollouts of its own shard of prompts (``batch_size`` completions a step, whole
prompt groups), the rewards are gathered for the group baselines, and the LoRA update is synchronised by DeepSpeed
(ZeRO-2/3) — or by DDP over gloo on CPU, see below. Prompts are the SFT's chat messages (two images: reference +
target) and go through the policy's processor and chat template inside trl. Rewards: ``rau_ray.train.rewards``
(format, accuracy, optional mask Dice through SAM2, built once per worker).

Per step, trl's logs (reward mean/std per reward function, ``kl``, completion lengths, clip ratios, entropy) go to
Ray Train (``ray.train.report``) and to TensorBoard under ``<storage_path>/<name>/tensorboard``. Checkpoints hold
the LoRA adapter (with the trainable ``<Seg>`` rows) as ``adapter.safetensors`` + ``train_state.json`` {step},
the SFT format, so ``rau_ray.train.sft.load_adapter_state`` reads both; a restarted run resumes from the latest
one and the step continues.

DeepSpeed on CPU: accelerate (1.15) only takes its DeepSpeed path for an accelerator device; on a CPU-only worker
its state finds no distributed backend and would run every worker as a 1-process world. Without a GPU the workers
therefore train with DDP over the gloo group Ray Train set up (same update: all-reduced LoRA gradients); with
``use_gpu`` the config goes to ``GRPOConfig(deepspeed=...)``. ``deepspeed_on_cpu`` opts into a pre-configured
accelerate state that does run DeepSpeed on CPU workers (see ``_accelerate_state``).
Use: ``run_grpo(GRPOJobConfig(manifest="data/ct/manifest.jsonl", sft_checkpoint="runs/train/sft/checkpoint_..."))``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rau_ray.errors import ConfigError

STATE_FILE = "train_state.json"  # the SFT checkpoint's name for it
ADAPTER_FILE = "adapter.safetensors"


@dataclass(frozen=True)
class GRPOJobConfig:
    manifest: str  # training manifest: rows of `split` are the targets, references come from `train`
    sft_checkpoint: str | None = None  # folder with the SFT adapter.safetensors; None starts from a fresh adapter
    storage_path: str = "runs/train"  # Ray Train storage: a local folder or s3:// / gs:// URI
    name: str = "grpo"  # run folder under storage_path; the same name resumes from its latest checkpoint
    profile: str = "tiny"  # model profile (rau_ray.models.profiles)
    split: str = "train"
    tasks: tuple[str, ...] = ("label", "ground", "all_boxes", "segment")
    num_workers: int = 2  # Ray Train workers; on GPU one per GPU
    cpus_per_worker: int = 1
    use_gpu: bool = False
    zero_stage: int = 2  # DeepSpeed ZeRO stage (2 or 3) where DeepSpeed runs (GPU, or deepspeed_on_cpu)
    deepspeed_on_cpu: bool = False  # CPU workers: DeepSpeed through a pre-configured accelerate state, not DDP
    num_generations: int = 4  # completions per prompt: the group whose mean is each completion's baseline
    batch_size: int = 4  # completions per worker and step (whole groups: a multiple of num_generations/workers)
    temperature: float = 1.0  # sampling temperature of the rollouts: GRPO needs diverse groups to learn from
    max_completion_length: int = 96  # tokens per rollout; longer ones are cut (and count in clipped_ratio)
    beta: float = 0.04  # KL penalty to the start adapter (DeepSeekMath's value); 0 skips the reference pass
    epsilon: float = 0.2  # PPO-style clip range of the probability ratio
    lr: float = 1e-3  # LoRA on the tiny random model tolerates a large rate; the paper config uses 1e-5..1e-6
    max_steps: int = 20  # optimizer steps in total (a resumed run counts the steps already done)
    checkpoint_every: int = 10  # steps between checkpoints (and the last step)
    max_failures: int = 1  # worker failures tolerated; the run restarts from the latest checkpoint
    seed: int = 0
    format_weight: float = 1.0  # weights of the rewards in the sum whose group-normalised value is the advantage
    accuracy_weight: float = 1.0
    mask_dice_weight: float = 0.0  # > 0 builds SAM2 + the RAU segmenter in every worker and scores segment masks
    segmenter_checkpoint: str | None = None  # trained RAUSegmenter weights (save_trainable) for the Dice reward
    tensorboard: bool = True  # trl's logs also to <storage_path>/<name>/tensorboard (rank 0)

    def validate(self) -> None:
        from rau_ray.models.prompts import TASKS

        if self.num_workers < 1 or self.batch_size < 1 or self.max_steps < 1 or self.checkpoint_every < 1:
            raise ConfigError("num_workers, batch_size, max_steps and checkpoint_every must be at least 1")
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be at least 2 (a group needs a baseline), got "
                              f"{self.num_generations}")
        if (self.batch_size * self.num_workers) % self.num_generations:
            raise ConfigError(f"batch_size x num_workers ({self.batch_size} x {self.num_workers}) must be a multiple "
                              f"of num_generations ({self.num_generations}): each step scores whole groups")
        if self.zero_stage not in (2, 3):
            raise ConfigError(f"zero_stage must be 2 or 3, got {self.zero_stage}")
        if not self.tasks or set(self.tasks) - set(TASKS):
            raise ConfigError(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks}")
        if self.temperature <= 0 or self.max_completion_length < 1 or self.beta < 0 or self.lr <= 0:
            raise ConfigError("temperature, max_completion_length and lr must be positive, beta non-negative")
        if min(self.format_weight, self.accuracy_weight, self.mask_dice_weight) < 0:
            raise ConfigError("reward weights must be non-negative")
        if self.mask_dice_weight > 0 and self.zero_stage == 3 and self._deepspeed:
            raise ConfigError("the mask Dice reward runs the policy outside DeepSpeed's forward; use zero_stage 2")
        if self.sft_checkpoint is not None and not (Path(self.sft_checkpoint) / ADAPTER_FILE).is_file():
            raise ConfigError(f"sft_checkpoint {self.sft_checkpoint}: no {ADAPTER_FILE} in it (give the folder "
                              f"of an SFT checkpoint: run_sft(...).checkpoint.path)")

    @property
    def _deepspeed(self) -> bool:
        return self.use_gpu or self.deepspeed_on_cpu


def adapter_state(model, zero_stage: int = 2) -> dict[str, torch.Tensor]:
    """The trained adapter of a peft model (LoRA + trainable ``<Seg>`` rows), gathered under ZeRO-3."""
    import deepspeed
    from peft import get_peft_model_state_dict

    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, enabled=zero_stage == 3):  # ZeRO-3 holds only a shard
        state = get_peft_model_state_dict(model, adapter_name="default")
        return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def load_checkpoint(model, folder: str | Path) -> int:
    """Load a checkpoint's adapter (SFT or GRPO) into the peft model's ``default`` adapter; returns its step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    result = set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_FILE)), adapter_name="default")
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k or "token" in k]
    if unexpected:
        raise ConfigError(f"{folder}: adapter does not fit this policy (unexpected {unexpected[:3]})")
    state = folder / STATE_FILE
    return int(json.loads(state.read_text())["step"]) if state.is_file() else 0


def _copy_to_reference(model) -> None:
    """trl copies the ``default`` adapter into the frozen ``ref`` one by parameter names containing ``.default.``;
    peft's trainable-token rows end in ``.default`` and are missed: copy them too, so the KL is to the start."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith(".default") and name[:-len("default")] + "ref" in params:
                params[name[:-len("default")] + "ref"].copy_(p)


def _patch_output_head(model) -> None:
    """trl 1.16's fused log-prob head reads ``lm_head.weight`` and ``lm_head.bias``; peft's trainable-token wrapper
    around the head serves ``weight`` (merged with the trained ``<Seg>`` row, differentiable) but has no ``bias``.
    The Qwen2.5-VL head has none, so the wrapper gets ``bias = None``."""
    head = model.get_output_embeddings()
    base = getattr(head, "original_module", None)
    if base is not None and not hasattr(head, "bias"):
        if getattr(base, "bias", None) is not None:
            raise ConfigError("the policy's output head has a bias, which trl's fused head cannot take through "
                              "peft's trainable tokens")
        head.bias = None


class Prompts:
    """Task items -> trl rows: the SFT's chat messages + the reward columns (see ``rau_ray.train.rewards``)."""

    def __init__(self, processor):
        from rau_ray.train.policy_examples import PolicyExamples

        self.processor, self.examples = processor, PolicyExamples(processor)

    def row(self, item: dict) -> dict:
        from rau_ray.models import prompts

        messages, solution = self.examples.example(item)
        target = [c["image"] for c in messages[1]["content"] if c["type"] == "image"][-1]
        h, w = prompts.resized_size(target.height, target.width, self.processor)
        return {"prompt": messages, "task": item["task"], "solution": solution, "image_size": [w, h],
                "structure": item["structure"], "manifest": item["manifest"], "reference": item["reference"],
                "target": item["target"]}

    def __call__(self, batch: dict) -> dict:
        """``datasets.Dataset.with_transform``: rows are built (images read) when trl's sampler asks for them."""
        n = len(batch["task"])
        rows = [self.row({k: batch[k][i] for k in batch}) for i in range(n)]
        return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def _accelerate_state() -> None:
    """DeepSpeed on CPU workers: accelerate's own setup finds no backend without an accelerator device and reports
    a 1-process world; a ``PartialState`` built here with the gloo backend (Ray Train's group) and DeepSpeed's flag
    is what ``TrainingArguments(accelerator_config={"use_configured_state": True})`` then uses."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(cpu=False, backend="gloo")


class _ReportToRay:
    """TrainerCallback: every trl log (once per step, on every worker) -> ``ray.train.report``; at checkpoint steps
    rank 0 adds the adapter + step as a Ray Train checkpoint."""

    def __new__(cls, *args, **kwargs):
        from transformers import TrainerCallback

        class ReportToRay(TrainerCallback):
            def __init__(self, cfg: GRPOJobConfig, start_step: int, rank: int, zero_stage: int):
                self.cfg, self.start_step, self.rank, self.zero_stage = cfg, start_step, rank, zero_stage

            def on_log(self, args, state, control, logs=None, model=None, **kwargs):
                import ray.train
                from safetensors.torch import save_file

                if not logs or "train_runtime" in logs:  # the end-of-training summary: no new step
                    return
                step = self.start_step + state.global_step
                metrics = {"step": step, **{k: float(v) for k, v in logs.items()
                                            if isinstance(v, (int, float)) and math.isfinite(float(v))}}
                last = state.global_step >= state.max_steps
                if step % self.cfg.checkpoint_every and not last:
                    ray.train.report(metrics)
                    return
                weights = adapter_state(model, self.zero_stage)  # every rank: ZeRO-3 gathers collectively
                with tempfile.TemporaryDirectory() as tmp:
                    if self.rank == 0:
                        save_file(weights, str(Path(tmp) / ADAPTER_FILE))
                        (Path(tmp) / STATE_FILE).write_text(json.dumps({"step": step, "config": asdict(self.cfg)}))
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp)
                                     if self.rank == 0 else None)

        return ReportToRay(*args, **kwargs)


def _tensorboard_dir(cfg: GRPOJobConfig) -> str | None:
    import importlib.util

    if not cfg.tensorboard:
        return None
    if not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
        return None  # transformers' TensorBoardCallback needs one of them
    if "://" in cfg.storage_path:
        return str(Path(tempfile.gettempdir()) / "rau-grpo-tensorboard" / cfg.name)  # remote storage: local logs
    return str(Path(cfg.storage_path).resolve() / cfg.name / "tensorboard")


def _reward_funcs(cfg: GRPOJobConfig, policy, model_cfg):
    from rau_ray.train import rewards

    funcs = [rewards.with_decoder(rewards.format_reward, policy.decode_completion),
             rewards.with_decoder(rewards.accuracy_reward, policy.decode_completion)]
    weights = [cfg.format_weight, cfg.accuracy_weight]
    if cfg.mask_dice_weight > 0:
        from rau_ray.models.fusion import RAUSegmenter
        from rau_ray.models.sam2_builder import build_sam2_model

        segmenter = RAUSegmenter(build_sam2_model(model_cfg.sam2), model_cfg.fusion).eval()  # once per worker
        if cfg.segmenter_checkpoint:
            segmenter.load_trainable(cfg.segmenter_checkpoint)
        segmenter.to(policy.device)
        funcs.append(rewards.with_decoder(rewards.MaskDiceReward(policy, segmenter), policy.decode_completion))
        weights.append(cfg.mask_dice_weight)
    return funcs, weights


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rau_ray.config import from_dict
    from rau_ray.models.policy import load_policy
    from rau_ray.models.profiles import get_profile
    from rau_ray.train.deepspeed import deepspeed_config

    items = config.pop("items")
    cfg = from_dict(GRPOJobConfig, config, "grpo config")
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    model_cfg = get_profile(cfg.profile)
    torch.manual_seed(cfg.seed)  # same adapter init on every worker
    policy = load_policy(model_cfg.policy)
    if cfg.sft_checkpoint:
        load_checkpoint(policy.model, cfg.sft_checkpoint)  # before trl copies it into the KL reference
    _patch_output_head(policy.model)

    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    resume_dir = None
    if checkpoint:
        resume_dir = tempfile.mkdtemp(prefix="rau-grpo-resume-")
        with checkpoint.as_directory() as folder:
            for name in (ADAPTER_FILE, STATE_FILE):
                Path(resume_dir, name).write_bytes(Path(folder, name).read_bytes())
        start_step = json.loads(Path(resume_dir, STATE_FILE).read_text())["step"]
    remaining = cfg.max_steps - start_step
    if remaining <= 0:
        return

    deepspeed = None
    accelerator_config = None
    if cfg.use_gpu or cfg.deepspeed_on_cpu:
        deepspeed = deepspeed_config(cfg.zero_stage, cfg.batch_size, cfg.lr, bf16=cfg.use_gpu)
        if not cfg.use_gpu and not os.environ.get("RAU_DEBUG_PLAIN_DS"):
            _accelerate_state()
            accelerator_config = {"use_configured_state": True}
    tb_dir = _tensorboard_dir(cfg)
    if tb_dir and rank == 0:
        os.environ["TENSORBOARD_LOGGING_DIR"] = tb_dir
    funcs, weights = _reward_funcs(cfg, policy, model_cfg)
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="rau-grpo-"),  # trl's own saving is off: Ray Train keeps checkpoints
        max_steps=remaining, per_device_train_batch_size=cfg.batch_size, num_generations=cfg.num_generations,
        temperature=cfg.temperature, max_completion_length=cfg.max_completion_length, beta=cfg.beta,
        epsilon=cfg.epsilon, learning_rate=cfg.lr, lr_scheduler_type="constant",  # a resumed run keeps the rate
        reward_weights=weights, seed=cfg.seed + start_step,  # a resumed run draws new prompts and samples
        logging_steps=1, save_strategy="no", report_to=["tensorboard"] if tb_dir else [],
        bf16=cfg.use_gpu, use_cpu=not cfg.use_gpu and not cfg.deepspeed_on_cpu,
        gradient_checkpointing=False,  # tiny activations; on the 7B turn it on in the profile, not here
        deepspeed=deepspeed, accelerator_config=accelerator_config,
        ddp_backend=None if cfg.use_gpu else "gloo", dataloader_num_workers=0, disable_tqdm=True)
    dataset = Dataset.from_list(items).with_transform(Prompts(policy.processor))
    trainer = GRPOTrainer(model=policy.model, reward_funcs=funcs, args=args, train_dataset=dataset,
                          processing_class=policy.processor,
                          callbacks=[_ReportToRay(cfg, start_step, rank, cfg.zero_stage if deepspeed else 0)])
    _copy_to_reference(policy.model)
    if resume_dir:
        load_checkpoint(policy.model, resume_dir)  # into `default` only: `ref` stays the start adapter
    trainer.train()
    print("DEBUGSTATE", rank, trainer.accelerator.state.distributed_type, trainer.accelerator.num_processes,
          trainer.accelerator.process_index, type(trainer.model_wrapped), trainer.is_deepspeed_enabled, flush=True)


def run_grpo(cfg: GRPOJobConfig):
    """Build task items, start the TorchTrainer, return Ray Train's Result (metrics, checkpoint, path)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rau_ray import ray_session
    from rau_ray.data.manifest import read_manifest
    from rau_ray.data.tasks import make_pairs

    cfg.validate()
    ray_session.connect()
    items = make_pairs(read_manifest(cfg.manifest), split=cfg.split, tasks=cfg.tasks, seed=cfg.seed)
    if not items:
        raise ConfigError(f"{cfg.manifest}: no reference-target pairs in split {cfg.split!r}")
    config = {**asdict(cfg), "items": items}
    if cfg.sft_checkpoint:
        config["sft_checkpoint"] = str(Path(cfg.sft_checkpoint).resolve())
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(storage_path=str(Path(cfg.storage_path).resolve()) if "://" not in cfg.storage_path
                             else cfg.storage_path, name=cfg.name,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    return trainer.fit()
