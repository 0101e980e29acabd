"""RMSNorm, optionally fused with the residual add that precedes it."""

from __future__ import annotations

import torch
from torch import nn

from pagedllm.layers.fused import use_fused


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, like Hugging Face's ``LlamaRMSNorm``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Without ``residual``: norm(x). With it: (norm(x + residual), x + residual)."""
        if use_fused(x):
            from pagedllm.kernels.elementwise import rms_norm

            if residual is None:
                return rms_norm(x, self.weight, self.eps)
            return rms_norm(x, self.weight, self.eps, residual), residual  # residual += x
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
