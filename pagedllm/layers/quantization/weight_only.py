"""What the weight-only integer methods (GPTQ, AWQ) share: parameters, checks, the matmul.

Both keep the checkpoint's packed tensors as they are (``qweight`` / ``qzeros`` int32,
``scales`` in the model dtype, GPTQ's ``g_idx``), registered with the layout attributes the
layers' shard-aware ``weight_loader`` reads (``output_dim`` / ``input_dim``, ``packed_dim`` /
``packed_factor``; see ``layers/weight_utils.py``): a fused q/k/v or gate/up layer then
places each checkpoint part at its columns, in packed words where the output dimension is
packed, which is why every part's width must be a whole number of words (checked here, at
construction, rather than discovered as a misaligned copy).

``apply`` dequantizes the whole weight and multiplies (``packing.py``): exact, and the path on
CPU. GPU kernels that read the packed words directly plug in here.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from pagedllm.layers.quantization.base import LinearMethodBase
from pagedllm.layers.weight_utils import set_weight_attrs


def register_param(
    layer: nn.Module, name: str, tensor: torch.Tensor, attrs: dict[str, Any]
) -> nn.Parameter:
    """Register ``tensor`` as frozen parameter ``name`` of ``layer`` with loading ``attrs``."""
    param = nn.Parameter(tensor, requires_grad=False)
    set_weight_attrs(param, attrs)
    layer.register_parameter(name, param)
    return param


def check_divisible(value: int, by: int, what: str, why: str) -> None:
    """Raise a ValueError naming ``what`` unless ``value`` is a multiple of ``by``."""
    if value % by:
        raise ValueError(f"{what} ({value}) is not a multiple of {by} ({why})")


class WeightOnlyLinearMethod(LinearMethodBase):
    """Integer weights with per-group scales and zero points; activations in the model dtype.

    Subclasses register their parameters and say how to turn them into the ``[K, N]`` weight
    (``dequantize``); ``apply`` computes ``x @ W (+ bias)``.
    """

    method_name = ""

    def __init__(self, bits: int, group_size: int) -> None:
        self.bits = bits
        self.group_size = group_size
        self.pack_factor = 32 // bits

    def num_groups(self, input_size_per_partition: int, layer: nn.Module) -> int:
        """Groups along this rank's inputs (one for ``group_size`` -1)."""
        if self.group_size == -1:
            return 1
        check_divisible(
            input_size_per_partition,
            self.group_size,
            f"{self._name(layer)} input size",
            f"{self.method_name} group size",
        )
        return input_size_per_partition // self.group_size

    def check_output_packing(self, layer: nn.Module, output_partition_sizes: list[int]) -> None:
        """Every fused part must start and end on a packed word of the output dimension."""
        for i, size in enumerate(output_partition_sizes):
            check_divisible(
                size,
                self.pack_factor,
                f"{self._name(layer)} output part {i}",
                f"{self.pack_factor} {self.bits}-bit values per int32 word of the "
                f"{self.method_name} layout",
            )

    @staticmethod
    def _name(layer: nn.Module) -> str:
        return getattr(layer, "prefix", "") or type(layer).__name__

    @abstractmethod
    def dequantize(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """The layer's ``[K, N]`` weight in ``dtype`` (``y = x @ W``)."""

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        w = self.dequantize(layer, x.dtype)
        y = torch.matmul(x, w)
        return y if bias is None else y + bias

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Reject a checkpoint whose integers fall outside the format (e.g. a bad ``g_idx``)."""
        self.check_loaded(layer)

    def check_loaded(self, layer: nn.Module) -> None:  # noqa: B027
        """Format checks after loading; none by default."""
