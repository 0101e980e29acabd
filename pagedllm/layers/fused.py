"""Chooses the fused Triton kernels for CUDA tensors, the plain PyTorch code otherwise.

Set ``PAGEDLLM_DISABLE_FUSED_KERNELS=1`` to force the PyTorch path (for comparisons).
"""

from __future__ import annotations

import importlib.util
import os

import torch

_ENABLED = (
    importlib.util.find_spec("triton") is not None
    and os.environ.get("PAGEDLLM_DISABLE_FUSED_KERNELS", "0") != "1"
)


def use_fused(x: torch.Tensor) -> bool:
    return _ENABLED and x.is_cuda
