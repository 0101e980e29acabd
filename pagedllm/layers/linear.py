"""Linear layers named and sharded for tensor parallelism, with pluggable weight formats.

Each layer asks the quantization hook (``layers/quantization``) for its method, lets it
register the weight parameters (dense ``weight`` by default; packed ones for GPTQ and the
like) and computes ``forward`` through ``quant_method.apply``. The layer keeps only what
depends on how it is sharded: the bias, and a ``weight_loader`` that every checkpoint-filled
parameter carries, which cuts this rank's slice (``tp_rank`` / ``tp_size`` from
``pagedllm.distributed``, read once at construction) and, for fused layers, places each
checkpoint part (q/k/v, gate/up) at its rows. The collectives (row-parallel all-reduce,
``gather_output``) go through ``get_tp_group()`` at forward time.

Sharded layouts (rank r of p, with tp_size = p):

* column-parallel: rank r holds output rows ``[r * N/p, (r+1) * N/p)``;
* merged gate/up: rank r holds ``[gate_r; up_r]`` (each part column-split as above), so the
  activation's half split stays local;
* q/k/v: rank r holds ``[q heads of r; k heads of r; v heads of r]``; with fewer KV heads
  than ranks (``p % num_kv_heads == 0``) each KV head is replicated on ``p / num_kv_heads``
  consecutive ranks, rank r holding KV head ``r // (p / num_kv_heads)``, so that every
  query head of rank r attends to the KV head it is grouped with in the unsharded model;
* row-parallel: rank r holds input columns ``[r * K/p, (r+1) * K/p)``; partial outputs are
  all-reduced (summed) across ranks and the bias is added once, by rank 0.

Quantization methods say whether they can be cut (``supports_tensor_parallel``): dense, fp8
(per-row scales follow their rows) and GPTQ / AWQ weights (packed words and group rows
follow their layout attributes) can; act-order GPTQ with a sharded input (row-parallel)
raises ``NotImplementedError`` at construction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.distributed import get_tp_group, get_tp_rank, get_tp_size
from pagedllm.layers.quantization import (
    QuantizationConfig,
    get_linear_method,
)
from pagedllm.layers.tensor_parallel import divide
from pagedllm.layers.weight_utils import (
    copy_checked,
    narrow_shard,
    param_label,
    set_weight_attrs,
)


class LinearBase(nn.Module):
    """Common construction: TP coordinates, the quant method, its weights, an optional bias."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.prefix = prefix
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.quant_method = get_linear_method(quant_config, self, prefix)
        self.has_bias = bias

    def _refuse_sharded_quantization(self) -> None:
        """Quantized weights are only cut per rank at tp_size 1 (module docstring)."""
        if self.tp_size > 1 and not self.quant_method.supports_tensor_parallel:
            raise NotImplementedError(
                f"{self.prefix or type(self).__name__}: {type(self.quant_method).__name__} "
                f"weights cannot be sharded over tensor_parallel_size={self.tp_size} yet; "
                "run this checkpoint with tensor_parallel_size=1"
            )

    def _create(self, input_per_partition: int, output_partition_sizes: list[int]) -> None:
        """Let the method register the weights, then add the (never quantized) bias."""
        self.quant_method.create_weights(
            self,
            input_per_partition,
            output_partition_sizes,
            self.input_size,
            self.output_size,
            self.params_dtype,
            weight_loader=self.weight_loader,
        )
        bias = None
        if self.has_bias:
            size = sum(output_partition_sizes)
            bias = nn.Parameter(torch.empty(size, dtype=self.params_dtype), requires_grad=False)
            set_weight_attrs(bias, {"output_dim": 0, "weight_loader": self.weight_loader})
        self.register_parameter("bias", bias)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        raise NotImplementedError

    def _label(self, param: nn.Parameter, shard_id: int | str | None = None) -> str:
        label = param_label(self, param, self.prefix)
        return label if shard_id is None else f"{label} (shard {shard_id!r})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)


class ReplicatedLinear(LinearBase):
    """The full weight on every rank (no sharding)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, **kw: Any) -> None:
        super().__init__(input_size, output_size, bias, **kw)
        self._create(input_size, [output_size])

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        assert shard_id is None, "a replicated layer has no shards"
        copy_checked(param.data, loaded, self._label(param))


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks: ``Y_r = X A_r^T`` with ``A_r`` rank r's rows.

    ``gather_output`` concatenates the ranks' outputs (an all-gather), so every rank gets
    the full ``Y``; without it each rank keeps its columns for the next (row-parallel) layer.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        gather_output: bool = False,
        output_sizes: list[int] | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(input_size, output_size, bias, **kw)
        self._refuse_sharded_quantization()
        self.gather_output = gather_output
        self.output_sizes = output_sizes or [output_size]
        self.output_partition_sizes = [
            divide(s, self.tp_size, f"{self.prefix or 'layer'} output size")
            for s in self.output_sizes
        ]
        self._create(input_size, self.output_partition_sizes)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        dim = getattr(param, "output_dim", None)
        what = self._label(param)
        if dim is not None:
            loaded = narrow_shard(loaded, dim, self.tp_rank, self.tp_size, param, what)
        copy_checked(param.data, loaded, what)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.gather_output and self.tp_size > 1:
            out = get_tp_group(self.tp_size).all_gather(out, dim=-1)
        return out


class _FusedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one GEMM, filled part by part.

    ``shard_ids`` name the checkpoint parts in output order; ``_shard_rows(shard_id)`` gives
    a part's (first row, rows) within this rank's fused rows, and ``_shard_slice(shard_id)``
    which of how many equal slices of the part's checkpoint tensor this rank holds.
    """

    shard_ids: tuple[int | str, ...] = ()

    def _shard_rows(self, shard_id: int | str) -> tuple[int, int]:
        raise NotImplementedError

    def _shard_slice(self, shard_id: int | str) -> tuple[int, int]:
        return self.tp_rank, self.tp_size

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        dim = getattr(param, "output_dim", None)
        packed = dim is not None and getattr(param, "packed_dim", None) == dim
        factor = param.packed_factor if packed else 1
        if shard_id is None and dim is not None:  # a fused checkpoint tensor: split it
            if any(total % factor for total in self.output_sizes):
                raise ValueError(
                    f"{self._label(param)}: parts of {self.output_sizes} rows do not line up "
                    f"with the {factor} values packed per element along dim {dim}"
                )
            if loaded.shape[dim] != sum(self.output_sizes) // factor:
                raise ValueError(
                    f"{self._label(param)} expects {sum(self.output_sizes) // factor} fused "
                    f"rows along dim {dim}, the checkpoint tensor has shape {tuple(loaded.shape)}"
                )
            start = 0
            for sid, total in zip(self.shard_ids, self.output_sizes, strict=True):
                self.weight_loader(param, loaded.narrow(dim, start, total // factor), sid)
                start += total // factor
            return
        what = self._label(param, shard_id)
        if shard_id is not None and shard_id not in self.shard_ids:
            raise ValueError(f"{what}: unknown shard id (expected one of {self.shard_ids})")
        if dim is None:  # not split along outputs (e.g. GPTQ's g_idx): every part is the same
            copy_checked(param.data, loaded, what)
            return
        offset, size = self._shard_rows(shard_id)
        if offset % factor or size % factor:
            raise ValueError(
                f"{what}: the part's rows [{offset}, {offset + size}) do not line up with the "
                f"{factor} values packed per element along dim {dim}"
            )
        dst = param.data.narrow(dim, offset // factor, size // factor)
        index, num_slices = self._shard_slice(shard_id)
        loaded = narrow_shard(loaded, dim, index, num_slices, dst, what)
        copy_checked(dst, loaded, what)


class MergedColumnParallelLinear(_FusedColumnParallelLinear):
    """Column-parallel projections fused along outputs, e.g. an MLP's gate and up.

    Shard ids are the part indices: ``gate_up_proj`` loads ``gate_proj`` as 0 and
    ``up_proj`` as 1.
    """

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False, **kw: Any
    ) -> None:
        self.shard_ids = tuple(range(len(output_sizes)))
        super().__init__(input_size, sum(output_sizes), bias, output_sizes=output_sizes, **kw)

    def _shard_rows(self, shard_id: int | str) -> tuple[int, int]:
        assert isinstance(shard_id, int)
        return sum(self.output_partition_sizes[:shard_id]), self.output_partition_sizes[shard_id]


class QKVParallelLinear(_FusedColumnParallelLinear):
    """The fused q/k/v projection of an attention block (shard ids ``"q"``, ``"k"``, ``"v"``).

    Query heads are split across ranks; so are KV heads when ``num_kv_heads >= tp_size``,
    else each rank holds one KV head, replicated over ``kv_replicas`` ranks (module doc).
    Counts that allow neither are a ``ValueError`` naming them.
    """

    shard_ids = ("q", "k", "v")

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = False,
        **kw: Any,
    ) -> None:
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        tp_size = get_tp_size()
        self.num_heads, self.num_kv_heads = split_attention_heads(
            total_num_heads, total_num_kv_heads, tp_size, kw.get("prefix", "")
        )
        self.kv_replicas = max(1, tp_size // total_num_kv_heads)
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        q, kv = total_num_heads * head_size, total_num_kv_heads * head_size
        # Per-rank part sizes ([q, kv, kv] / tp_size) do not hold under replication, so the
        # parent gets totals that divide into exactly this rank's rows.
        q_rank, kv_rank = self.num_heads * head_size, self.num_kv_heads * head_size
        super().__init__(
            hidden_size,
            q + 2 * kv,
            bias,
            output_sizes=[q_rank * tp_size, kv_rank * tp_size, kv_rank * tp_size],
            **kw,
        )
        self.output_sizes = [q, kv, kv]  # what a fused checkpoint tensor holds

    def _shard_rows(self, shard_id: int | str) -> tuple[int, int]:
        q_rows = self.num_heads * self.head_size
        kv_rows = self.num_kv_heads * self.head_size
        starts = {"q": 0, "k": q_rows, "v": q_rows + kv_rows}
        return starts[shard_id], q_rows if shard_id == "q" else kv_rows

    def _shard_slice(self, shard_id: int | str) -> tuple[int, int]:
        if shard_id == "q":
            return self.tp_rank, self.tp_size
        return self.tp_rank // self.kv_replicas, self.tp_size // self.kv_replicas


def split_attention_heads(
    num_heads: int, num_kv_heads: int, tp_size: int, what: str = ""
) -> tuple[int, int]:
    """(query heads, KV heads) of one of ``tp_size`` ranks, or a ValueError naming the counts.

    Query heads must divide evenly; KV heads too, or (fewer KV heads than ranks) ``tp_size``
    must be a multiple of them so that each is replicated on the same number of ranks.
    """
    kv_ok = num_kv_heads % tp_size == 0 if num_kv_heads >= tp_size else tp_size % num_kv_heads == 0
    if num_heads % tp_size or not kv_ok:
        where = f"{what}: " if what else ""
        raise ValueError(
            f"{where}a model with {num_heads} attention heads and {num_kv_heads} KV heads "
            f"cannot be split over tensor_parallel_size={tp_size}: the attention heads must "
            "be divisible by it, and the KV heads divisible by it or a divisor of it."
        )
    return num_heads // tp_size, max(1, num_kv_heads // tp_size)


class RowParallelLinear(LinearBase):
    """Input features split across ranks: ``Y = sum_r X_r A_r^T`` (+ bias once).

    ``reduce_results`` all-reduces the partial sums so every rank gets ``Y``; without it the
    caller reduces (e.g. after fusing more work into the same collective).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        reduce_results: bool = True,
        **kw: Any,
    ) -> None:
        super().__init__(input_size, output_size, bias, **kw)
        self._refuse_sharded_quantization()
        self.reduce_results = reduce_results
        self.input_size_per_partition = divide(
            input_size, self.tp_size, f"{self.prefix or 'layer'} input size"
        )
        self._create(self.input_size_per_partition, [output_size])

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        dim = getattr(param, "input_dim", None)
        what = self._label(param)
        if dim is not None:
            loaded = narrow_shard(loaded, dim, self.tp_rank, self.tp_size, param, what)
        copy_checked(param.data, loaded, what)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.quant_method.apply(self, x, self.bias)
        out = self.quant_method.apply(self, x, self.bias if self.tp_rank == 0 else None)
        return get_tp_group(self.tp_size).all_reduce(out) if self.reduce_results else out
