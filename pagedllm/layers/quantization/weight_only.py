"""What the weight-only integer methods (GPTQ, AWQ) share: parameters, checks, one layout.

Both register the checkpoint's packed tensors as they are (``qweight`` / ``qzeros`` int32,
``scales`` in the model dtype, GPTQ's ``g_idx``), with the layout attributes the layers'
shard-aware ``weight_loader`` reads (``output_dim`` / ``input_dim``, ``packed_dim`` /
``packed_factor``; see ``layers/weight_utils.py``): a fused q/k/v or gate/up layer then places
each checkpoint part at its columns, in packed words where the output dimension is packed,
which is why every part's width must be a whole number of words (checked here, at
construction, rather than discovered as a misaligned copy).

After loading, both formats become one layout (``canonicalize``), which the CPU path and the
GPU kernel (``kernels/int4_gemm.py``) read:

* ``w_packed`` int32 ``[K / pf, N]``: the values packed along the input dimension (GPTQ's
  order; AWQ is repacked), with act-order rows sorted by group, so that row ``k`` is in
  group ``k // group_size`` and a block of rows needs one row of scales;
* ``w_perm`` int64 ``[K]`` or None: the input columns in that order (``x[:, w_perm]``);
* ``w_zeros`` uint8 ``[G, N]``: the zero points, unpacked (GPTQ's v1 offset undone);
* ``scales`` ``[G, N]`` as loaded.

The checkpoint tensors are then dropped, so the weights are held once. ``apply`` runs the
Triton kernel for fp16 / bf16 inputs on CUDA, else dequantizes and multiplies (exact: the
CPU reference path).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from pagedllm.layers.quantization.base import LinearMethodBase
from pagedllm.layers.quantization.packing import pack_rows, unpack_rows
from pagedllm.layers.weight_utils import set_weight_attrs

CHECKPOINT_TENSORS = ("qweight", "qzeros", "g_idx")


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

    Subclasses register their checkpoint parameters and say how to read them as integers
    (``checkpoint_values``); the rest (checks, the one layout, ``apply``) is shared.
    """

    method_name = ""
    # Cut per rank by the layers' loaders like dense weights (packed words and group rows
    # follow their layout attributes); act-order GPTQ refuses a sharded input by name.
    supports_tensor_parallel = True

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

    def group_index(self, input_size: int, device: torch.device | None = None) -> torch.Tensor:
        """Each input row's group without act-order: ``row // group_size`` (all 0 for -1)."""
        group = input_size if self.group_size == -1 else self.group_size
        return torch.arange(input_size, device=device) // group

    def register_zeros_and_scales(
        self,
        layer: nn.Module,
        groups: int,
        n: int,
        params_dtype: torch.dtype,
        extra_weight_attrs: dict[str, Any],
    ) -> None:
        """``qzeros`` (packed along the outputs) and ``scales``, one row per input group; both
        formats store them this way. One group (-1) covers every input: no input_dim to shard."""
        group_dim = {} if self.group_size == -1 else {"input_dim": 0}
        pf = self.pack_factor
        register_param(
            layer,
            "qzeros",
            torch.zeros(groups, n // pf, dtype=torch.int32),
            {**group_dim, "output_dim": 1, "packed_dim": 1, "packed_factor": pf}
            | extra_weight_attrs,
        )
        register_param(
            layer,
            "scales",
            torch.zeros(groups, n, dtype=params_dtype),
            {**group_dim, "output_dim": 1} | extra_weight_attrs,
        )

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
    def checkpoint_values(
        self, layer: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loaded layer as ``(q [K, N], zeros [G, N], group of each row [K])`` integers."""

    def packed_as_is(self, layer: nn.Module) -> torch.Tensor | None:
        """The checkpoint's words when they already are ``w_packed`` (no act-order
        permutation needed), else None; saves unpacking and repacking the weight."""
        return None

    def zero_points(self, layer: nn.Module) -> torch.Tensor:
        """The ``[G, N]`` zero points (used with :meth:`packed_as_is`)."""
        return self.checkpoint_values(layer)[1]

    def check_loaded(self, layer: nn.Module) -> None:  # noqa: B027
        """Format checks after loading (before canonicalizing); none by default."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Check the loaded integers, then convert them to the one layout (module doc)."""
        if hasattr(layer, "w_packed"):
            return
        self.check_loaded(layer)
        as_is = self.packed_as_is(layer)
        if as_is is not None:
            packed, perm, zeros = as_is, None, self.zero_points(layer)
        else:
            q, zeros, groups = self.checkpoint_values(layer)
            packed, perm = canonicalize(q, groups, self.bits, self.group_size, self._name(layer))
        for name in CHECKPOINT_TENSORS:
            if name in layer._parameters:
                delattr(layer, name)
        layer.register_buffer("w_packed", packed, persistent=False)
        layer.register_buffer("w_perm", perm, persistent=False)
        layer.register_buffer("w_zeros", zeros.to(torch.uint8), persistent=False)

    def dequantize(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        """The ``[K, N]`` weight in ``dtype``, rows in ``w_perm`` order (``y = x[:, perm] @ W``)."""
        q = unpack_rows(layer.w_packed, self.bits)
        k = q.shape[0]
        g = torch.arange(k, device=q.device) // (k if self.group_size == -1 else self.group_size)
        return (q - layer.w_zeros[g].to(torch.int32)).to(dtype) * layer.scales[g].to(dtype)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not hasattr(layer, "w_packed"):
            raise RuntimeError(
                f"{self._name(layer)}: process_weights_after_loading has not run (the loader "
                "calls it once the checkpoint is in)"
            )
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            from pagedllm.kernels.int4_gemm import int_weight_linear

            shape = x.shape
            y = int_weight_linear(
                x.reshape(-1, shape[-1]),
                layer.w_packed,
                layer.w_zeros,
                layer.scales,
                layer.w_perm,
                self.bits,
                self.group_size,
                bias,
            )
            return y.reshape(*shape[:-1], y.shape[-1])
        if layer.w_perm is not None:
            x = x[..., layer.w_perm]
        y = torch.matmul(x, self.dequantize(layer, x.dtype))
        return y if bias is None else y + bias


def canonicalize(
    q: torch.Tensor, groups: torch.Tensor, bits: int, group_size: int, what: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(w_packed, w_perm)`` of values ``q`` [K, N] whose row ``k`` is in group ``groups[k]``.

    Rows are sorted by group (stably; no permutation when already sorted). Each group must
    then hold ``group_size`` consecutive rows, as act-order checkpoints do (their ``g_idx``
    is a permutation of ``k // group_size``); anything else is rejected by name.
    """
    k = q.shape[0]
    expected = torch.arange(k, device=q.device) // (k if group_size == -1 else group_size)
    perm: torch.Tensor | None = None
    if not torch.equal(groups, expected):
        sorted_groups, order = torch.sort(groups, stable=True)
        if not torch.equal(sorted_groups, expected):
            raise ValueError(
                f"{what}: g_idx does not give every group exactly {group_size} input rows; "
                "only such act-order layouts are supported"
            )
        perm = order
        q = q[order]
    return pack_rows(q, bits), perm
