"""SAM2's precision: bf16 autocast on CUDA, plain fp32 elsewhere — one rule for serving and training.

SAM2 keeps fp32 weights and runs its image encoder, memory attention and mask decoder under
``torch.autocast(bfloat16)`` on GPUs, as SAM2's own predictor examples do (about twice as fast, half the activation
memory); on a CPU bf16 would be slower and change the results, so nothing changes there. The Serve Segmenter
(``rau_ray.serve.deployments``) and the segmenter training (``rau_ray.train.seg_base``: losses and validation; the
backward pass and the optimizer step stay outside) both enter it, so a segmenter is trained as it is served.
Use: ``with sam2_autocast(device): logits = segmenter.predict(...)``; ``sam2_dtype(device)`` says which it picks.
"""

from __future__ import annotations

import contextlib

import torch


def sam2_dtype(device: str | torch.device) -> torch.dtype:
    """The compute dtype SAM2 runs in on ``device``: bfloat16 on CUDA, float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def sam2_autocast(device: str | torch.device) -> contextlib.AbstractContextManager:
    """A context to run SAM2 in on ``device``: bf16 autocast on CUDA, a no-op (fp32) elsewhere."""
    if sam2_dtype(device) == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=sam2_dtype(device))
