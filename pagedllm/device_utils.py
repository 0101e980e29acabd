"""Host-to-device copies that never stall the stream.

A copy from pageable host memory makes CUDA wait for all work queued before it, which would
serialize the CPU's preparation of step N+1 behind the GPU's step N. Staging through pinned
memory (PyTorch's caching host allocator) keeps the copy asynchronous.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def h2d(values: Sequence[Any] | np.ndarray | torch.Tensor, dtype: torch.dtype,
        device: torch.device) -> torch.Tensor:  # fmt: skip
    """``values`` as a tensor on ``device``, copied asynchronously when it is a GPU."""
    if isinstance(values, torch.Tensor):
        t = values.to(dtype)
    elif isinstance(values, np.ndarray):
        t = torch.from_numpy(values).to(dtype)
    else:
        t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
