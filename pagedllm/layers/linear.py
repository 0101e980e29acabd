"""Linear layers that know how to load Hugging Face checkpoint shards into fused weights."""

from __future__ import annotations

import torch
from torch import nn


class MergedLinear(nn.Linear):
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
