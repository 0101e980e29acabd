"""The weight-only GEMM dispatch (``kernels/int4_dispatch.py``): measured table, then heuristics.

Plain host code, so it runs on CPU; the kernels it names are checked on GPU in
``test_int4_gemm.py``.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm.kernels import int4_dispatch
from pagedllm.kernels.int4_dispatch import heuristic_config, pick_config, split_for

CPU = torch.device("cpu")


@pytest.mark.parametrize("m,block_m", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 4), (8, 4)])
def test_few_rows_get_the_gemv_with_rows_tiled_by_at_most_four(
    m: int, block_m: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(int4_dispatch, "GEMV_ENABLED", True)
    cfg = heuristic_config(m, 5120, 5120, 4, CPU)
    assert cfg["KERNEL"] == "gemv" and cfg["BLOCK_M"] == block_m


@pytest.mark.parametrize("m", [1, 2, 8])
def test_few_rows_take_tensor_core_tiles_until_the_gemv_is_checked_on_a_gpu(m: int) -> None:
    assert not int4_dispatch.GEMV_ENABLED  # PAGEDLLM_INT4_GEMV unset
    cfg = heuristic_config(m, 5120, 5120, 4, CPU)
    assert cfg["KERNEL"] == "dot" and cfg["BLOCK_M"] == 16


@pytest.mark.parametrize(
    "m,block_m", [(9, 16), (16, 16), (17, 32), (64, 64), (65, 128), (512, 128)]
)
def test_more_rows_get_tensor_core_tiles(m: int, block_m: int) -> None:
    cfg = heuristic_config(m, 5120, 5120, 4, CPU)
    assert cfg["KERNEL"] == "dot" and cfg["BLOCK_M"] == block_m
    if m > 64:
        assert cfg["SPLIT_K"] == 1


def test_k_split_fills_the_grid_but_keeps_two_blocks_per_slice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(int4_dispatch, "GEMV_ENABLED", True)
    assert split_for(programs=40, k_blocks=40, target=32) == 1  # already past the target
    assert split_for(programs=10, k_blocks=40, target=80) == 8
    assert split_for(programs=1, k_blocks=8, target=1000) == 4  # 8 blocks: 4 slices of 2
    cfg = heuristic_config(1, 5120, 5120, 4, CPU)  # 10 tiles of 512, 8 "SMs" off CUDA: 32
    assert cfg["SPLIT_K"] == 2


def test_measured_buckets_win_over_the_heuristic(monkeypatch: pytest.MonkeyPatch) -> None:
    small = {"KERNEL": "gemv", "BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4}
    mid = {"KERNEL": "dot", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2}
    large = {"KERNEL": "dequant"}
    monkeypatch.setattr(
        int4_dispatch, "MEASURED", {(7168, 5120): [(1, small), (16, mid), (256, large)]}
    )
    assert pick_config(1, 7168, 5120, 128, 4, CPU) is small
    assert pick_config(2, 7168, 5120, 128, 4, CPU) is mid
    assert pick_config(16, 7168, 5120, 128, 4, CPU) is mid
    assert pick_config(17, 7168, 5120, 128, 4, CPU) is large
    assert pick_config(4096, 7168, 5120, 128, 4, CPU) is large  # past the last bucket
    # Another shape, or 8-bit weights of this one, fall back to the heuristic.
    assert pick_config(1, 5120, 5120, 128, 4, CPU) == heuristic_config(1, 5120, 5120, 4, CPU)
    assert pick_config(1, 7168, 5120, 128, 8, CPU) == heuristic_config(1, 7168, 5120, 8, CPU)


def test_a_none_bucket_defers_to_the_heuristic(monkeypatch: pytest.MonkeyPatch) -> None:
    mid = {"KERNEL": "dot", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2}
    monkeypatch.setattr(int4_dispatch, "MEASURED", {(7168, 5120): [(8, None), (16, mid)]})
    assert pick_config(8, 7168, 5120, 128, 4, CPU) == heuristic_config(8, 7168, 5120, 4, CPU)
    assert pick_config(9, 7168, 5120, 128, 4, CPU) is mid


def test_the_measured_table_is_well_formed() -> None:
    """Ascending M buckets, each a config of a known kernel (or None: the heuristic)."""
    for (n, k), buckets in int4_dispatch.MEASURED.items():
        ms = [m for m, _ in buckets]
        assert ms == sorted(ms) and len(set(ms)) == len(ms), (n, k)
        for _, cfg in buckets:
            assert cfg is None or cfg["KERNEL"] in ("gemv", "dot", "dequant"), (n, k)
            if cfg is not None and cfg["KERNEL"] != "dequant":
                assert cfg["REDUCE"] != "atomic" or cfg["SPLIT_K"] == 1  # deterministic sums
