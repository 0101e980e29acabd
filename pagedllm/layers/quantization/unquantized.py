"""The unquantized linear method: a dense ``weight`` [out, in], cuBLAS or the skinny GEMM.

Decode steps of a few sequences multiply a handful of rows by the whole weight; for some
shapes the Triton skinny GEMM (``kernels/skinny_gemm.py``) beats cuBLAS there. Each layer
carries ``skinny_max_rows``: batches of at most that many rows go to the Triton kernel. 0
(the default) means never; ``worker/linear_tuning.py`` sets it per layer at start-up from a
measurement against cuBLAS.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.layers.quantization.base import LinearMethodBase
from pagedllm.layers.weight_utils import set_weight_attrs


class UnquantizedLinearMethod(LinearMethodBase):
    """Dense weights in the model dtype; ``F.linear``, or the skinny GEMM for few rows."""

    supports_tensor_parallel = True

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        weight = nn.Parameter(
            torch.empty(sum(output_partition_sizes), input_size_per_partition, dtype=params_dtype),
            requires_grad=False,
        )
        set_weight_attrs(weight, {"input_dim": 1, "output_dim": 0, **extra_weight_attrs})
        layer.register_parameter("weight", weight)
        layer.skinny_max_rows = 0

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if 0 < x.shape[0] <= layer.skinny_max_rows and x.dim() == 2 and x.stride(1) == 1:
            from pagedllm.kernels.skinny_gemm import skinny_linear

            return skinny_linear(x, layer.weight, bias)
        return F.linear(x, layer.weight, bias)
