"""The two interfaces a quantization scheme implements: a config, and a per-layer method.

A linear layer does not own its parameters' layout or its matmul: at construction it asks
the model's :class:`QuantizationConfig` (``None`` = unquantized) for a :class:`LinearMethodBase`
and lets it ``create_weights`` (register parameters such as ``weight``, or GPTQ's
``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``, each with loading attributes and a
``weight_loader``), ``apply`` the layer to an input, and ``process_weights_after_loading``
(repack for a kernel, transpose, ...). The layer keeps the sharding logic (its
``weight_loader`` cuts the tensor-parallel and fused-shard slices along the dimensions the
method declared), so a new scheme needs neither loader nor model changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class LinearMethodBase(ABC):
    """How one linear layer stores its weights and computes ``y = x W^T (+ bias)``."""

    # Whether the layers' shard-aware loaders may cut this method's parameters per tensor-
    # parallel rank (their layout attributes say how); a method that has not been checked
    # at tensor_parallel_size > 1 is refused there by name.
    supports_tensor_parallel = False

    @abstractmethod
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
        """Register the layer's weight parameters on ``layer``.

        ``output_partition_sizes`` lists this rank's output rows of each fused part (one
        entry for a plain layer; q/k/v or gate/up for fused ones); ``input_size`` and
        ``output_size`` are the unsharded totals. ``extra_weight_attrs`` (at least
        ``weight_loader``, the layer's shard-aware loader) should be set on every
        parameter the checkpoint fills, together with its ``output_dim`` / ``input_dim``
        (and ``packed_dim`` / ``packed_factor`` if packed); see ``layers/weight_utils.py``.
        """

    @abstractmethod
    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The layer's output for input rows ``x`` [..., input_size_per_partition]."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027
        """Called once after all weights are loaded (or dummy-initialised); no-op by default."""


class QuantizationConfig(ABC):
    """A checkpoint's quantization scheme: picks the method of each layer.

    Subclasses register under their Hugging Face ``quant_method`` name with
    ``@register_quantization_config("gptq")`` (``layers/quantization/__init__.py``) and are
    built from the ``quantization_config`` section of ``config.json``.
    """

    @classmethod
    @abstractmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        """Build from the ``quantization_config`` dict of ``config.json``."""

    @abstractmethod
    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        """The method for ``layer`` (named ``prefix`` in the model); ``None`` = unquantized."""
