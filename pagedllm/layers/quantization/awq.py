"""AWQ checkpoints (``quant_method: awq``, ``version: gemm``): 4-bit weights with zero points.

An AWQ GEMM linear layer of ``K`` inputs and ``N`` outputs stores (``G = K / group_size``)::

    qweight  int32 [K, N / 8]    packed along the output dimension, AWQ order
    qzeros   int32 [G, N / 8]    likewise (zero points stored as they are)
    scales   fp16  [G, N]

AWQ's activation-aware scaling is folded into the weights and the preceding norms by the
quantizer, so serving needs nothing beyond dequantizing. ``modules_to_not_convert`` names
modules the quantizer left dense: a layer whose name contains one of them is built unquantized.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.layers.quantization import register_quantization_config
from pagedllm.layers.quantization.base import LinearMethodBase, QuantizationConfig
from pagedllm.layers.quantization.packing import AWQ_ORDER, unpack_cols
from pagedllm.layers.quantization.weight_only import WeightOnlyLinearMethod, register_param


@register_quantization_config("awq")
class AWQConfig(QuantizationConfig):
    """The ``quantization_config`` of an AWQ checkpoint (validated in ``config/model.py``)."""

    def __init__(self, group_size: int, modules_to_not_convert: list[str] | None = None) -> None:
        self.bits = 4
        self.group_size = group_size
        self.modules_to_not_convert = list(modules_to_not_convert or [])

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AWQConfig:
        bits = int(config.get("bits", config.get("w_bit", 4)))
        if bits != 4:
            raise ValueError(f"AWQ with {bits} bits is not supported (supported: 4)")
        group_size = int(config.get("group_size", config.get("q_group_size", -1)))
        return cls(group_size, config.get("modules_to_not_convert"))

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        from pagedllm.layers.linear import LinearBase

        if not isinstance(layer, LinearBase):
            return None
        if any(skip in prefix for skip in self.modules_to_not_convert):
            return None
        return AWQLinearMethod(self)


class AWQLinearMethod(WeightOnlyLinearMethod):
    """Registers the three AWQ tensors; reads them into the shared layout (weight_only.py)."""

    method_name = "AWQ"

    def __init__(self, config: AWQConfig) -> None:
        super().__init__(config.bits, config.group_size)
        self.config = config

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
        k, n, pf = input_size_per_partition, sum(output_partition_sizes), self.pack_factor
        self.check_output_packing(layer, output_partition_sizes)
        groups = self.num_groups(k, layer)
        register_param(
            layer,
            "qweight",
            torch.zeros(k, n // pf, dtype=torch.int32),
            {"input_dim": 0, "output_dim": 1, "packed_dim": 1, "packed_factor": pf}
            | extra_weight_attrs,
        )
        self.register_zeros_and_scales(layer, groups, n, params_dtype, extra_weight_attrs)

    def checkpoint_values(
        self, layer: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = unpack_cols(layer.qweight, self.bits, AWQ_ORDER)
        zeros = unpack_cols(layer.qzeros, self.bits, AWQ_ORDER)
        return q, zeros, self.group_index(q.shape[0], q.device)
