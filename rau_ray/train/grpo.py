"""GRPO of the policy on Ray Train: trl's ``GRPOTrainer`` in every worker, starting from the SFT adapter.

The driver builds reference-target task items from a manifest (as SFT does) and hands them to every worker; trl's
sampler repeats each prompt ``num_generations`` times and accelerate splits every generation batch over the
workers, so each worker samples the rollouts of its own shard of prompts (``batch_size`` completions a step, whole
groups), the rewards are gathered for the group baselines, and DeepSpeed ZeRO-2 synchronises the LoRA update.
Prompts are the SFT's chat messages (two images: reference + target) and go through the policy's processor and
chat template inside trl. Rewards: ``rau_ray.train.rewards`` — format, accuracy, and optionally the mask Dice
through SAM2 (segmenter built once per worker).

Every ``log_every`` steps trl's logs (reward mean/std per reward, ``kl``, completion lengths, clip ratios,
entropy) go to Ray Train (``ray.train.report``, every worker), into the run's history, and with ``report_to`` to
TensorBoard / MLflow (``rau_ray.train.tracking``: rank 0's rows). Checkpoints are the project's
(``rau_ray.train.run``): the adapter with the trainable ``<Seg>`` rows as ``weights.safetensors``,
``train_state.json`` {step, config} and the history; a restarted run resumes from the latest one and its step
continues (the KL reference stays the start adapter).

Adjustments to trl 1.16 / accelerate 1.15 / peft 0.21, each small and explained where it is made:
- DeepSpeed on CPU workers: accelerate takes its DeepSpeed path only with an accelerator device; on CPU its own
  setup finds no backend and runs each worker as a 1-process world (the first all-gather of rewards then fails on
  Ray's 2-process gloo group). ``deepspeed.use_deepspeed_on_cpu`` builds the state accelerate would build on a
  GPU, on gloo, and the trainer uses it (``use_configured_state``). ``deepspeed: false`` trains with DDP over gloo instead.
- peft's trainable ``<Seg>`` row in the output head: ``_patch_output_head`` (trl's fused head reads its bias) and
  ``_copy_to_reference`` (trl's copy of the start adapter into its KL reference misses those rows). The same row
  rules out ZeRO-3 (see ``GRPOJobConfig.validate``); LoRA GRPO replicates the frozen base under ZeRO-2 anyway.
- trl decodes completions without special tokens, so ``<Seg>`` would vanish: the rewards re-decode the ids with
  the policy's decoder (``rewards.with_decoder``).
Rollouts come from the policy's ``generate``, or with ``use_vllm: true`` from vLLM inside each training process
(trl's ``colocate`` mode: no extra GPUs, the LoRA weights synced into it every step); that takes GPUs and the vllm
package, and a config asking for it without either is refused when it is loaded, before any worker starts.
Use: ``run_grpo(GRPOJobConfig(manifest="data/ct/manifest.jsonl", sft_checkpoint="runs/train/sft/checkpoint_..."))``
or ``rau train grpo --config jobs/configs/grpo-tiny.yaml``.
"""  # noqa: E501

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, replace

import ray.train.torch
import torch
from datasets import Dataset
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from rau_ray import storage
from rau_ray.config import from_dict
from rau_ray.data.manifest import read_manifest
from rau_ray.data.tasks import make_pairs
from rau_ray.errors import ConfigError, DataError
from rau_ray.models.checkpoint import STATE, locate_checkpoint, read_weights_and_state
from rau_ray.models.fusion import RAUSegmenter
from rau_ray.models.policy import load_policy
from rau_ray.models.profiles import ModelConfig, model_config_from
from rau_ray.models.prompts import TASKS
from rau_ray.models.retrieval import reference_picker
from rau_ray.models.sam2_builder import build_sam2_model
from rau_ray.storage import local_copy
from rau_ray.train import rewards, run
from rau_ray.train.deepspeed import deepspeed_config, use_deepspeed_on_cpu
from rau_ray.train.policy_examples import PolicyExamples
from rau_ray.train.run import TrainJobConfig


@dataclass(frozen=True, kw_only=True)
class GRPOJobConfig(TrainJobConfig):
    manifest: str  # training manifest: targets from `split`, references from its train split
    name: str = "grpo"  # run folder under scale.storage_path; the same name resumes from its latest checkpoint
    sft_checkpoint: str | None = None  # SFT checkpoint or run folder (its latest), local or s3:// / gs://; None: fresh
    model: ModelConfig | None = None  # YAML: a profile + overrides (models.profiles); None: the SFT checkpoint's,
    #                                   else tiny
    split: str = "train"
    tasks: tuple[str, ...] = ("label", "ground", "all_boxes", "segment")
    structures: tuple[str, ...] | None = None  # ask only about these (a curriculum / a subset); None: all of them
    deepspeed: bool = True  # DeepSpeed syncs the LoRA update (on CPU too); false: DDP over gloo / nccl
    zero_stage: int = 2  # DeepSpeed ZeRO-2: optimizer state + gradients sharded (ZeRO-3: see validate)
    num_generations: int = 4  # completions per prompt: the group whose mean reward is each one's baseline
    batch_size: int = 4  # completions per worker and step; batch_size x workers must hold whole groups
    temperature: float = 1.0  # rollout sampling temperature: GRPO learns only from groups that differ
    max_completion_length: int = 128  # tokens per rollout (the tiny tokenizer spends ~90 on a label answer)
    beta: float = 0.04  # KL penalty to the start adapter (DeepSeekMath's value); 0 skips the reference pass
    epsilon: float = 0.2  # PPO-style clip range of the probability ratio (trl logs how often it clips)
    lr: float = 1e-3  # LoRA on the tiny random base takes a large rate; on the 7B use ~1e-6..1e-5
    max_steps: int = 20  # optimizer steps in total; a resumed run counts the steps already done
    log_every: int = 1  # steps between metric reports (each one syncs every worker with Ray Train)
    checkpoint_every: int = 10  # steps between checkpoints, a multiple of log_every (the last step always saves)
    format_weight: float = 1.0  # weights of the rewards in the sum whose group-normalised value is the advantage
    accuracy_weight: float = 1.0
    mask_dice_weight: float = 0.0  # > 0 builds SAM2 + the RAU segmenter once per worker, scores segment masks
    segmenter_checkpoint: str | None = None  # trained segmenter weights (RAUSegmenter.save_trainable) for Dice;
    #                                          a local file or a URI
    gradient_checkpointing: bool = False  # recompute activations in backward: off for tiny, on for the 7B's
    use_vllm: bool = False  # rollouts by vLLM in each training process (trl's colocate mode): GPUs + the vllm package

    def validate(self) -> None:
        super().validate()
        if min(self.batch_size, self.max_steps) < 1:
            raise ConfigError("batch_size and max_steps must be at least 1")
        if self.checkpoint_every % self.log_every:
            raise ConfigError(f"checkpoint_every ({self.checkpoint_every}) must be a multiple of log_every "
                              f"({self.log_every}): checkpoints go out with the metric reports")
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be at least 2 (a group needs a baseline), got "
                              f"{self.num_generations}")
        if (self.batch_size * self.scale.num_workers) % self.num_generations:
            raise ConfigError(f"batch_size x num_workers ({self.batch_size} x {self.scale.num_workers}) must be a "
                              f"multiple of num_generations ({self.num_generations}): each step scores whole groups")
        if self.zero_stage == 3:
            # trl 1.16's fused log-prob head gathers lm_head.weight as a ZeRO-3 parameter, but the trainable <Seg>
            # row makes peft serve a merged tensor there (and peft sets up the KL reference's rows under ZeRO-3
            # with CUDA tensors only). LoRA GRPO keeps the frozen base replicated either way: ZeRO-2 is the stage.
            raise ConfigError("zero_stage 3 is not supported for GRPO (trl's fused head cannot gather the policy's "
                              "trainable <Seg> output row); use zero_stage 2")
        if self.zero_stage != 2:
            raise ConfigError(f"zero_stage must be 2, got {self.zero_stage}")
        if self.use_vllm and not self.scale.use_gpu:
            raise ConfigError("use_vllm: vLLM generates on GPUs only; set scale.use_gpu: true, or use_vllm: false")
        if self.use_vllm and importlib.util.find_spec("vllm") is None:
            raise ConfigError("use_vllm: the vllm package is not installed on this machine (README 'Install': "
                              "vLLM pins its own torch); install it, or set use_vllm: false")
        if not self.tasks or set(self.tasks) - set(TASKS):
            raise ConfigError(f"tasks must be a non-empty subset of {TASKS}, got {list(self.tasks)}")
        if self.temperature <= 0 or self.max_completion_length < 1 or self.lr <= 0 or self.beta < 0:
            raise ConfigError("temperature, max_completion_length and lr must be positive, beta non-negative")
        if min(self.format_weight, self.accuracy_weight, self.mask_dice_weight) < 0:
            raise ConfigError("reward weights must be non-negative")

    def model_config(self) -> ModelConfig:
        """The model config: given, else the SFT checkpoint's (its adapter only fits that), else tiny."""
        if self.model is not None:
            return self.model
        if self.sft_checkpoint:
            state = _read_state(self.sft_checkpoint)
            section = state.get("config", {}).get("model")
            if isinstance(section, dict):
                return model_config_from(section, f"{self.sft_checkpoint}: model")
        return ModelConfig()


def _sft_checkpoint(source: str | os.PathLike) -> str:
    """The SFT checkpoint folder ``source`` means (a checkpoint, or a run folder's latest; a local path or a URI)."""
    try:
        return locate_checkpoint(source)
    except DataError as e:
        raise DataError(f"sft_checkpoint: {e}; give an SFT run's folder or one of its checkpoint folders "
                        f"(run_sft(...).checkpoint.path)") from None


def _read_state(source: str | os.PathLike) -> dict:
    text = storage.read_text(storage.join(_sft_checkpoint(source), STATE))
    try:
        return json.loads(text)
    except ValueError as e:
        raise DataError(f"{source}: unreadable {STATE} ({e})") from None


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The trained ``default`` adapter of a peft model (LoRA + trainable ``<Seg>`` rows; ZeRO-2 and DDP keep them
    whole on every rank), without trl's ``ref`` copy."""
    state = get_peft_model_state_dict(model, adapter_name="default")
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}


def load_adapter(model, weights: dict[str, torch.Tensor], where: str = "checkpoint") -> None:
    """Weights from ``adapter_state`` (or an SFT checkpoint) into the peft model's ``default`` adapter."""
    try:
        set_peft_model_state_dict(model, weights, adapter_name="default")
    except RuntimeError as e:  # shape mismatch: another LoRA rank, targets or vocabulary
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "mismatch" in line or "Missing" in line), lines[-1] if lines else "")
        raise ConfigError(f"{where}: the adapter does not fit this policy ({detail[:200]}); give the model "
                          f"section it was trained with") from None


def _copy_to_reference(model) -> None:
    """trl copies the ``default`` adapter into the frozen ``ref`` one (the KL reference) by parameter names that
    contain ``.default.``; peft's trainable-token rows are named ``....default`` and are missed. Copy them too."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            ref = name[:-len("default")] + "ref"
            if name.endswith(".default") and ref in params:
                params[ref].copy_(p)


def _patch_output_head(model) -> None:
    """trl 1.16's fused log-prob head reads ``lm_head.weight`` and ``lm_head.bias``; peft's trainable-token wrapper
    around the head serves ``weight`` (merged with the trained ``<Seg>`` row, differentiable) but not ``bias``.
    Qwen2.5-VL's head has none, so the wrapper answers ``None``."""
    head = model.get_output_embeddings()
    base = getattr(head, "original_module", None)
    if base is not None and not hasattr(head, "bias"):
        if getattr(base, "bias", None) is not None:
            raise ConfigError("the policy's output head has a bias, which trl's fused head cannot read through "
                              "peft's trainable tokens")
        head.bias = None


class Prompts:
    """Task items -> trl rows: the SFT's chat messages + the reward columns (see ``rau_ray.train.rewards``)."""

    def __init__(self, processor):
        self.examples = PolicyExamples(processor)

    def row(self, item: dict) -> dict:
        messages, solution = self.examples.example(item)
        truth = self.examples.truth(item)
        return {"prompt": messages, "task": item["task"], "solution": solution, "image_size": truth["image_size"],
                "structure": item["structure"], "manifest": item["manifest"], "reference": item["reference"],
                "target": item["target"]}

    def __call__(self, batch: dict) -> dict:
        """For ``datasets.Dataset.with_transform``: rows are built (images read) when trl's sampler asks."""
        rows = [self.row({k: batch[k][i] for k in batch}) for i in range(len(batch["task"]))]
        return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def _callback(cfg: GRPOJobConfig, start_step: int, history: list[dict]):
    """A TrainerCallback: trl's logs -> ``run.report`` on every worker (Ray Train wants all of them); at checkpoint
    steps and the last one, rank 0 also saves the adapter, the step and the history."""
    class ReportToRay(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True  # the last step always reports (and checkpoints)

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if not logs or "train_runtime" in logs:  # the end-of-training summary is not a step
                return
            step = start_step + state.global_step
            row = {"step": step, **{k: float(v) for k, v in logs.items()
                                    if isinstance(v, (int, float)) and math.isfinite(float(v))}}
            history.append(row)
            save = step % cfg.checkpoint_every == 0 or state.global_step >= state.max_steps
            weights = adapter_state(model) if save else None
            run.report(row, weights=weights, step=step, history=history, config=asdict(cfg))

    return ReportToRay()


def reward_funcs(cfg: GRPOJobConfig, policy, model_cfg, device="cpu") -> tuple[list, list[float]]:
    """The reward callables (re-decoding with the policy's decoder, which keeps ``<Seg>``) and their weights."""
    decode = policy.decode_completion
    funcs = [rewards.with_decoder(rewards.format_reward, decode, name="format"),
             rewards.with_decoder(rewards.accuracy_reward, decode, name="accuracy")]
    weights = [cfg.format_weight, cfg.accuracy_weight]
    if cfg.mask_dice_weight > 0:
        segmenter = RAUSegmenter(build_sam2_model(model_cfg.sam2), model_cfg.fusion)  # once per worker
        if cfg.segmenter_checkpoint:  # a local file or a URI (downloaded once per node)
            segmenter.load_trainable(local_copy(cfg.segmenter_checkpoint, "segmenter_checkpoint"))
        segmenter.to(device).eval()
        funcs.append(rewards.with_decoder(rewards.MaskDiceReward(policy, segmenter), decode, name="mask_dice"))
        weights.append(cfg.mask_dice_weight)
    return funcs, weights


def vllm_args(cfg: GRPOJobConfig) -> dict:
    """trl's GRPOConfig fields for the rollout engine: vLLM colocated in each training process, or none (trl's
    default: the policy's own ``generate``)."""
    return {"use_vllm": True, "vllm_mode": "colocate"} if cfg.use_vllm else {}


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: ``config`` = {"cfg": GRPOJobConfig as a dict, "items": task items}."""
    cfg = from_dict(GRPOJobConfig, config["cfg"], "grpo config")
    model_cfg = cfg.model_config()
    run.prepare_worker(cfg.scale)
    torch.manual_seed(cfg.seed)  # the same adapter init on every worker
    policy = load_policy(model_cfg.policy)
    if cfg.sft_checkpoint:
        weights, _ = read_weights_and_state(cfg.sft_checkpoint)
        load_adapter(policy.model, weights, cfg.sft_checkpoint)  # before trl copies it into the KL reference
    _patch_output_head(policy.model)
    resumed = run.resume()
    if cfg.max_steps - resumed.step <= 0:
        return  # a finished run restarted: nothing left to do

    use_ds = cfg.deepspeed
    ds_config = deepspeed_config(cfg.zero_stage, cfg.batch_size, cfg.lr, bf16=cfg.scale.use_gpu,
                                 torch_adam=not cfg.scale.use_gpu) if use_ds else None
    if use_ds and not cfg.scale.use_gpu:
        use_deepspeed_on_cpu()
    funcs, weights = reward_funcs(cfg, policy, model_cfg, ray.train.torch.get_device())
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="rau-grpo-"),  # nothing is saved there: Ray Train keeps checkpoints
        max_steps=cfg.max_steps - resumed.step, per_device_train_batch_size=cfg.batch_size,
        num_generations=cfg.num_generations, temperature=cfg.temperature,
        max_completion_length=cfg.max_completion_length, beta=cfg.beta, epsilon=cfg.epsilon,
        learning_rate=cfg.lr, lr_scheduler_type="constant",  # a resumed run continues at the same rate
        disable_dropout=True,  # LoRA dropout would make the policy and reference log-probs differ at step 0
        reward_weights=weights, seed=cfg.seed + resumed.step,  # a resumed run draws new prompts and samples
        logging_steps=cfg.log_every, save_strategy="no", report_to=[],  # report_to of the job: run.fit
        bf16=cfg.scale.use_gpu, use_cpu=not cfg.scale.use_gpu and not use_ds,
        deepspeed=ds_config, accelerator_config={"use_configured_state": True} if use_ds and not cfg.scale.use_gpu
        else None, gradient_checkpointing=cfg.gradient_checkpointing, dataloader_num_workers=0, disable_tqdm=True,
        **vllm_args(cfg))
    dataset = Dataset.from_list(config["items"]).with_transform(Prompts(policy.processor))
    trainer = GRPOTrainer(model=policy.model, reward_funcs=funcs, args=args, train_dataset=dataset,
                          processing_class=policy.processor,
                          callbacks=[_callback(cfg, resumed.step, resumed.history)])
    _copy_to_reference(policy.model)
    if resumed.weights is not None:  # into `default` only: the KL reference stays the start adapter
        load_adapter(policy.model, resumed.weights, "resumed checkpoint")
    trainer.train()


def run_grpo(cfg: GRPOJobConfig):
    """Build task items, run the TorchTrainer, return Ray Train's Result (last metrics, checkpoint, path)."""
    cfg.validate()
    if cfg.sft_checkpoint:  # the exact checkpoint (absolute: workers have another cwd), recorded in the config
        cfg = replace(cfg, sft_checkpoint=_sft_checkpoint(cfg.sft_checkpoint))
    cfg = replace(cfg, model=cfg.model_config())  # resolved: checkpoints record the model they fit
    retrieval = cfg.model.retrieval
    items = make_pairs(read_manifest(cfg.manifest), split=cfg.split, tasks=cfg.tasks, seed=cfg.seed,
                       retrieve=reference_picker(retrieval))  # references as the DINOv2 bank retrieves them
    if cfg.structures is not None:
        items = [i for i in items if i["structure"] in cfg.structures]
    if not items:
        raise ConfigError(f"{cfg.manifest}: no reference-target pairs in split {cfg.split!r}"
                          + (f" about {', '.join(cfg.structures)}" if cfg.structures is not None else ""))
    return run.fit(train_loop_per_worker, {"cfg": asdict(cfg), "items": items}, cfg.scale, cfg.name,
                   job=cfg)
