"""GPTQ checkpoints (``quant_method: gptq``): 4- or 8-bit weights, v1 zero points, act-order.

A GPTQ linear layer of ``K`` inputs and ``N`` outputs stores (``pf = 32 / bits``, ``G`` groups:
``K / group_size``, or 1 for ``group_size`` -1)::

    qweight  int32 [K / pf, N]   packed along the input dimension
    qzeros   int32 [G, N / pf]   packed along the output dimension, v1 convention
    scales   fp16  [G, N]
    g_idx    int32 [K]           group of each input row (act-order permutes them)

``sym`` needs nothing special: symmetric checkpoints store the midpoint as every zero point.
``desc_act`` checkpoints need ``g_idx``; others may omit it (then row ``k`` is in group
``k // group_size``). In a fused layer every part (q/k/v, gate/up) has its own ``g_idx``; they
share one input, hence one act-order, and a checkpoint whose parts disagree is rejected rather
than served with one part's groups.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.layers.quantization import register_quantization_config
from pagedllm.layers.quantization.base import LinearMethodBase, QuantizationConfig
from pagedllm.layers.quantization.packing import gptq_zeros, unpack_rows
from pagedllm.layers.quantization.weight_only import (
    WeightOnlyLinearMethod,
    check_divisible,
    register_param,
)

SUPPORTED_BITS = (4, 8)


@register_quantization_config("gptq")
class GPTQConfig(QuantizationConfig):
    """The ``quantization_config`` of a GPTQ checkpoint (validated in ``config/model.py``)."""

    def __init__(self, bits: int, group_size: int, desc_act: bool, sym: bool) -> None:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"GPTQ with {bits} bits is not supported (supported: 4, 8)")
        self.bits = bits
        self.group_size = group_size
        self.desc_act = desc_act
        self.sym = sym

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GPTQConfig:
        return cls(
            bits=int(config["bits"]),
            group_size=int(config.get("group_size", -1)),
            desc_act=bool(config.get("desc_act", False)),
            sym=bool(config.get("sym", True)),
        )

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        from pagedllm.layers.linear import LinearBase

        return GPTQLinearMethod(self) if isinstance(layer, LinearBase) else None


class GPTQLinearMethod(WeightOnlyLinearMethod):
    """Registers the four GPTQ tensors; reads them into the shared layout (weight_only.py)."""

    method_name = "GPTQ"

    def __init__(self, config: GPTQConfig) -> None:
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
        if self.config.desc_act and k != input_size:
            # TODO(tp): act-order groups span the whole input; a row-parallel shard needs the
            # full scales / zeros and its slice of g_idx (as global group numbers).
            raise NotImplementedError(
                f"{self._name(layer)}: act-order GPTQ with the input dimension sharded across "
                "tensor-parallel ranks is not implemented"
            )
        check_divisible(k, pf, f"{self._name(layer)} input size", f"{pf} values per word")
        self.check_output_packing(layer, output_partition_sizes)
        groups = self.num_groups(k, layer)
        register_param(
            layer,
            "qweight",
            torch.zeros(k // pf, n, dtype=torch.int32),
            {"input_dim": 0, "output_dim": 1, "packed_dim": 0, "packed_factor": pf}
            | extra_weight_attrs,
        )
        self.register_zeros_and_scales(layer, groups, n, params_dtype, extra_weight_attrs)
        layer_loader = extra_weight_attrs["weight_loader"]
        register_param(
            layer,
            "g_idx",
            self.group_index(k).to(torch.int32),
            {
                "input_dim": 0,
                "weight_loader": _SameForEveryPart(layer_loader),
                # Random (dummy) weights keep this valid grouping.
                "dummy_keep": True,
                # Without act-order the checkpoint may leave g_idx out: k // group_size.
                "optional_in_checkpoint": not self.config.desc_act,
            },
        )

    def checkpoint_values(
        self, layer: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = unpack_rows(layer.qweight, self.bits)
        return q, gptq_zeros(layer.qzeros, self.bits), layer.g_idx.long()

    def packed_as_is(self, layer: nn.Module) -> torch.Tensor | None:
        trivial = self.group_index(layer.g_idx.shape[0], layer.g_idx.device)
        return layer.qweight.data if torch.equal(layer.g_idx.long(), trivial) else None

    def zero_points(self, layer: nn.Module) -> torch.Tensor:
        return gptq_zeros(layer.qzeros, self.bits)

    def check_loaded(self, layer: nn.Module) -> None:
        groups = layer.scales.shape[0]
        g_idx = layer.g_idx
        k = g_idx.shape[0]
        if k != layer.input_size and g_idx.numel():
            # A row-parallel rank (no act-order: create_weights refused it) holds input rows
            # [rank * k, (rank + 1) * k) and the groups of just those rows; the checkpoint's
            # g_idx numbers them globally: renumber from this rank's first group.
            first = layer.tp_rank * k
            group = layer.input_size if self.group_size == -1 else self.group_size
            rows = torch.arange(first, first + k, device=g_idx.device)
            if torch.equal(g_idx.long(), rows // group):
                g_idx.data -= first // group
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise ValueError(
                f"{self._name(layer)}.g_idx has groups outside [0, {groups}) "
                f"(min {int(g_idx.min())}, max {int(g_idx.max())})"
            )


class _SameForEveryPart:
    """``g_idx`` loader: the first part's tensor is loaded, later parts must equal it."""

    def __init__(self, layer_loader: Any) -> None:
        self.layer_loader = layer_loader
        self.first: torch.Tensor | None = None
        self.first_part: int | str | None = None

    def __call__(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        if self.first is None:
            self.layer_loader(param, loaded, shard_id)
            self.first, self.first_part = loaded.clone(), shard_id
            return
        if self.first.shape != loaded.shape or not torch.equal(self.first, loaded):
            raise ValueError(
                f"g_idx of part {shard_id!r} differs from part {self.first_part!r}: the parts "
                "of a fused layer must share one act-order (one input)"
            )
