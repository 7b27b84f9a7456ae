"""DeepSpeed for the policy's LoRA training: the config (ZeRO-2 by default, ZeRO-3 as an option, bf16 on GPU) and
the accelerate state that lets transformers' Trainer / trl's trainers run DeepSpeed on CPU workers too.

Use: ``args = TrainingArguments(..., deepspeed=deepspeed_config(2, 4, 1e-4))``; on CPU workers call
``use_deepspeed_on_cpu()`` first and pass ``accelerator_config={"use_configured_state": True}``.
"""

from __future__ import annotations

import os

from accelerate import PartialState


def deepspeed_config(zero_stage: int, micro_batch: int, lr: float, bf16: bool = False,
                     grad_clip: float = 1.0, grad_accumulation: int = 1, torch_adam: bool = False) -> dict:
    """Concrete values (no "auto"): the Trainer checks them against its arguments, which must say the same.
    ``torch_adam``: torch's AdamW steps the (sharded) parameters instead of DeepSpeed's fused Adam, which on a CPU
    worker is a C++ op compiled on first use (about a minute on 2 cores, and again whenever its flags change); for
    a LoRA's few parameters the two are equally fast."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    zero = {"stage": zero_stage, "overlap_comm": False}
    if zero_stage == 3:
        # ZeRO-3 gathers each layer's weights for its forward/backward and frees them after. DeepSpeed's defaults
        # keep up to 1e9 gathered parameters alive for reuse (the whole of a 7B's shard and more), which gives
        # back the memory ZeRO-3 saves; these bounds keep a few layers' worth.
        zero.update(stage3_max_live_parameters=int(5e7), stage3_max_reuse_distance=0,
                    stage3_prefetch_bucket_size=int(1e7), stage3_param_persistence_threshold=int(1e4))
    return {
        "train_micro_batch_size_per_gpu": micro_batch,  # per worker, GPU or not (DeepSpeed's name)
        "gradient_accumulation_steps": grad_accumulation,
        "gradient_clipping": grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0, **({"torch_adam": True} if torch_adam else {})}},  # noqa: E501
        "zero_optimization": zero,  # ZeRO-2: optimizer state + gradients sharded; ZeRO-3: the parameters too
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # progress goes to Ray Train metrics, not DeepSpeed's log
        "wall_clock_breakdown": False,
    }


def use_deepspeed_on_cpu() -> None:
    """DeepSpeed on CPU workers. accelerate's ``PartialState(cpu=False)`` looks for CUDA/XPU/NPU... to choose a
    backend and, finding none, reports a 1-process world even inside Ray's gloo group; with ``cpu=True`` it skips
    DeepSpeed. Built here with ``backend="gloo"`` and DeepSpeed's flag it joins Ray's group as a DeepSpeed world
    (DeepSpeed's own CPU accelerator does the rest); ``TrainingArguments(accelerator_config={
    "use_configured_state": True})`` then uses it instead of building its own."""
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(cpu=False, backend="gloo")
