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
from pagedllm.layers.quantization.gptq import GPTQConfig
from pagedllm.models.loader import load_model
from tests.distributed.tp_harness import model_logits, save_model_logits, spawn_ranks
from tests.fixtures.quantized_models import materialize

# The tiny models' logits reach ~100: summing a split contraction in another order moves
# them by a few fp32 ulps (~1e-5 each); a misplaced shard moves them by whole units.
ATOL = 3e-4


def _check_against_tp1(
    tiny_models: Any, tmp_path: Path, world_size: int, arches: list[str]
) -> None:
    _check_cases(tmp_path, world_size, {arch: str(tiny_models(arch)) for arch in arches})


def _check_cases(tmp_path: Path, world_size: int, cases: dict[str, str]) -> None:
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


@pytest.mark.parametrize(
    "name", ["gptq-llama-int8-g64", "gptq-qwen2-int4-asym-g-1", "awq-qwen2-int4-g32"]
)
def test_tp2_quantized_checkpoints_equal_tp1(
    name: str, tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    """GPTQModel's checkpoints cut over 2 ranks: packed words along the outputs (fused q/k/v
    and gate/up parts included) and along the inputs, group rows of scales and zero points,
    GPTQ's g_idx renumbered per rank; group size -1 keeps its one group on every rank."""
    model = materialize(name, tmp_path / name, tiny_tokenizer_dir)
    _check_cases(tmp_path, 2, {name: str(model)})


def test_act_order_gptq_refuses_a_sharded_input(fake_tp_size: Any) -> None:
    quant = GPTQConfig(4, 32, True, True)
    fake_tp_size(2)
    ColumnParallelLinear(64, 64, quant_config=quant, prefix="proj")  # whole inputs: fine
    with pytest.raises(NotImplementedError, match=r"^proj: act-order GPTQ with the input"):
        RowParallelLinear(64, 64, quant_config=quant, prefix="proj")
