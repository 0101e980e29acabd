"""Tensor-parallel models on CPU: TP=2 and TP=4 gloo ranks give TP=1's logits.

Each spawned rank loads the same tiny checkpoint, keeps only its slices (column-parallel
q/k/v and gate/up, row-parallel o/down with an all-reduce, vocabulary-split embedding and LM
head with an all-gather) and runs two steps over a paged KV cache (``tp_harness``). Every
rank must then hold the TP=1 logits of every row in fp32. TP=4 covers KV heads replicated
over ranks (llama's 2 KV heads over 4 ranks); the tied models (qwen3, llama3) share one
vocabulary shard between embedding and head. Head counts that cannot be split are a
``ValueError`` naming them, before any weight is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pagedllm.config import EngineConfig
from pagedllm.distributed import TensorParallelGroup, parallel_state
from pagedllm.layers.linear import ColumnParallelLinear, RowParallelLinear
from pagedllm.layers.quantization.awq import AWQConfig
from pagedllm.layers.quantization.gptq import GPTQConfig
from pagedllm.models.loader import load_model
from tests.distributed.tp_harness import model_logits, save_model_logits, spawn_ranks

# The tiny models' logits reach ~100: summing a split contraction in another order moves
# them by a few fp32 ulps (~1e-5 each); a misplaced shard moves them by whole units.
ATOL = 3e-4


def _check_against_tp1(
    tiny_models: Any, tmp_path: Path, world_size: int, arches: list[str]
) -> None:
    cases = {arch: str(tiny_models(arch)) for arch in arches}
    spawn_ranks(save_model_logits, world_size, tmp_path, cases, str(tmp_path))
    for arch, model_dir in cases.items():
        want = model_logits(Path(model_dir))
        for rank in range(world_size):
            got = torch.load(tmp_path / f"{arch}.rank{rank}.pt")
            assert got.shape == want.shape, (arch, rank)
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=f"{arch} rank {rank}")
            assert torch.equal(got.argmax(-1), want.argmax(-1)), (arch, rank)


def test_tp2_logits_equal_tp1(tiny_models: Any, tmp_path: Path) -> None:
    """llama, qwen2 (q/k/v bias), qwen3 (q/k norm, tied), llama3 (rope scaling, tied), mistral."""
    _check_against_tp1(tiny_models, tmp_path, 2, ["llama", "qwen2", "qwen3", "llama3", "mistral"])


def test_tp4_replicated_kv_heads_equal_tp1(tiny_models: Any, tmp_path: Path) -> None:
    """2 KV heads over 4 ranks: each KV head is held by two ranks (qwen3 also tied)."""
    _check_against_tp1(tiny_models, tmp_path, 4, ["llama", "qwen3"])


@pytest.fixture
def fake_tp_size(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Pretend this process is rank 0 of ``size`` (construction only: no collective runs)."""

    def set_size(size: int) -> None:
        monkeypatch.setattr(parallel_state, "_tp_group", TensorParallelGroup(0, size))

    return set_size


@pytest.mark.parametrize(
    ("arch", "tp", "numbers"),
    [
        (
            "llama",
            3,
            "4 attention heads and 2 KV heads cannot be split over tensor_parallel_size=3",
        ),
        (
            "llama",
            8,
            "4 attention heads and 2 KV heads cannot be split over tensor_parallel_size=8",
        ),
        (
            "mistral",
            3,
            "8 attention heads and 2 KV heads cannot be split over tensor_parallel_size=3",
        ),
    ],
)
def test_bad_tp_size_names_the_head_counts(
    tiny_models: Any, fake_tp_size: Any, arch: str, tp: int, numbers: str
) -> None:
    fake_tp_size(tp)
    config = EngineConfig(
        model=str(tiny_models(arch)), device="cpu", dtype="float32", load_format="dummy"
    )
    with pytest.raises(ValueError, match=rf"^\w+ForCausalLM: a model with {numbers}"):
        load_model(config)


@pytest.mark.parametrize("quant", [GPTQConfig(4, 32, False, True), AWQConfig(32)])
def test_quantized_sharded_layers_refuse_tp(fake_tp_size: Any, quant: Any) -> None:
    for cls in (ColumnParallelLinear, RowParallelLinear):
        cls(64, 64, quant_config=quant, prefix="proj")  # TP=1: built as before
    fake_tp_size(2)
    for cls in (ColumnParallelLinear, RowParallelLinear):
        with pytest.raises(NotImplementedError, match=r"^proj: \w+ weights cannot be sharded"):
            cls(64, 64, quant_config=quant, prefix="proj")
