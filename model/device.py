"""Where a model runs: "auto" device and dtype resolved to what this machine has, and how
much memory a KV cache may take there.

"auto" is CUDA when a GPU is visible, else the CPU; bfloat16 on a GPU that supports it, else
float32. Named dtypes accept torch's names and their short forms.
"""

from __future__ import annotations

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    """A torch dtype for `device` (already resolved); raises ValueError for unknown names."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]


CPU_KV_BUDGET = 2 << 30  # bytes: a fixed share of a small machine's memory
GPU_KV_SHARE = 0.5  # of the GPU memory still free once the weights are loaded


def default_kv_budget(device: str) -> int:
    """Bytes of KV cache to allow on `device` when none is configured."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free * GPU_KV_SHARE)
    return CPU_KV_BUDGET
