"""Linear layers: a skinny-batch fast path, and fused weights loaded from HF checkpoint shards."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Linear(nn.Linear):
    """``nn.Linear`` that sends batches of at most ``skinny_max_rows`` rows (decode steps of
    a few sequences) to the Triton skinny GEMM. 0 (the default) means never; the runner sets
    it per layer from a start-up measurement against cuBLAS (``worker/linear_tuning.py``)."""

    skinny_max_rows: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if 0 < x.shape[0] <= self.skinny_max_rows and x.dim() == 2 and x.stride(1) == 1:
            from pagedllm.kernels.skinny_gemm import skinny_linear

            return skinny_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """One GEMM for several projections that read the same input (q/k/v, gate/up).

    Checkpoints store the parts separately; ``load_shard`` copies part ``shard_id`` into
    its row range of the fused weight (and bias).
    """

    def __init__(self, in_features: int, out_sizes: dict[str, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(out_sizes.values()), bias=bias)
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in out_sizes.items():
            self.offsets[name] = (start, size)
            start += size

    def load_shard(self, param_name: str, shard_id: str, loaded: torch.Tensor) -> None:
        param = self.weight if param_name == "weight" else self.bias
        assert param is not None, f"{param_name} not present"
        start, size = self.offsets[shard_id]
        if loaded.shape[0] != size:
            raise ValueError(f"shard {shard_id} has {loaded.shape[0]} rows, expected {size}")
        param.data.narrow(0, start, size).copy_(loaded)
