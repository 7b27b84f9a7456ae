"""DeepSpeed configuration for the policy's LoRA training: ZeRO-2 by default, ZeRO-3 as an option, bf16 on GPU.

Use: ``engine, *_ = deepspeed.initialize(model=m, model_parameters=params, config=deepspeed_config(2, 4, 1e-4))``.
"""

from __future__ import annotations


def deepspeed_config(zero_stage: int, micro_batch: int, lr: float, bf16: bool = False,
                     grad_clip: float = 1.0) -> dict:
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0-3, got {zero_stage}")
    return {
        "train_micro_batch_size_per_gpu": micro_batch,  # per worker, GPU or not (DeepSpeed's name)
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.0}},
        "zero_optimization": {"stage": zero_stage, "overlap_comm": False},  # ZeRO-3 also shards the parameters
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # progress goes to Ray Train metrics, not DeepSpeed's log
        "wall_clock_breakdown": False,
    }
