"""Gated activations used by the MLP blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.layers.fused import use_fused


class SiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]`` over a fused gate/up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_fused(x):
            from pagedllm.kernels.elementwise import silu_and_mul

            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
