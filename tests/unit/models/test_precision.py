"""SAM2's precision rule (rau_ray.models.precision): fp32 with no autocast on CPU, bf16 autocast for a CUDA device.
Run: ``.venv/bin/pytest tests/unit/models/test_precision.py``."""

import warnings

import pytest
import torch

from rau_ray.models.precision import sam2_autocast, sam2_dtype


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_cpu_is_plain_fp32(device):
    assert sam2_dtype(device) == torch.float32
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with sam2_autocast(device):
        assert not torch.is_autocast_enabled("cpu") and not torch.is_autocast_enabled("cuda")
        out = a @ b
    assert out.dtype == torch.float32 and torch.equal(out, a @ b)  # nothing changed: same dtype, same numbers


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_cuda_gets_bf16_autocast(device):
    assert sam2_dtype(device) == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... disabling autocast" on a machine without one
        ctx = sam2_autocast(device)
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16
