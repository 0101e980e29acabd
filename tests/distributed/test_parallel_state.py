"""The TP group wrapper: a no-op single rank by default, gloo collectives once initialized,
and a clear error when a layer's rank count differs from the process group's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pagedllm.distributed import (
    TensorParallelGroup,
    destroy_tensor_parallel,
    get_tp_group,
    get_tp_rank,
    get_tp_size,
    init_tensor_parallel,
)
from tests.distributed.tp_harness import spawn_ranks


def test_single_rank_is_a_no_op() -> None:
    group = get_tp_group()
    assert (get_tp_rank(), get_tp_size(), group.world_size) == (0, 1, 1)
    x = torch.randn(3, 4)
    assert group.all_reduce(x) is x and group.all_gather(x, dim=0) is x
    assert init_tensor_parallel(0, 1, "unused") is get_tp_group()  # nothing to join
    destroy_tensor_parallel()
    with pytest.raises(RuntimeError, match=r"built for tensor_parallel_size=2 .* group of 1 rank"):
        get_tp_group(2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        TensorParallelGroup(2, 2)


def test_importing_the_package_stays_light() -> None:
    heavy = ("transformers", "triton", "pagedllm.layers", "pagedllm.config")
    code = f"import sys, pagedllm.distributed; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _collectives(rank: int, world_size: int) -> None:
    group = get_tp_group(world_size)
    assert (get_tp_rank(), get_tp_size()) == (rank, world_size)
    summed = group.all_reduce(torch.full((2, 3), float(rank + 1)))
    assert torch.equal(summed, torch.full((2, 3), float(sum(range(1, world_size + 1)))))
    blocks = group.all_reduce(torch.tensor([100 - rank, rank]), op="min")
    assert blocks.tolist() == [101 - world_size, 0]
    assert group.all_reduce(torch.tensor([rank]), op="max").tolist() == [world_size - 1]
    with pytest.raises(ValueError, match="unknown all-reduce op 'avg'"):
        group.all_reduce(torch.zeros(1), op="avg")
    mine = torch.arange(6.0).view(2, 3) + 10 * rank
    parts = [torch.arange(6.0).view(2, 3) + 10 * r for r in range(world_size)]
    assert torch.equal(group.all_gather(mine, dim=-1), torch.cat(parts, dim=-1))
    assert torch.equal(group.all_gather(mine, dim=0), torch.cat(parts, dim=0))
    with pytest.raises(RuntimeError, match="already initialized"):
        init_tensor_parallel(rank, world_size, "file:///nowhere")


def test_gloo_collectives_on_two_ranks(tmp_path: Path) -> None:
    spawn_ranks(_collectives, 2, tmp_path)
    assert get_tp_size() == 1  # the parent never joined
