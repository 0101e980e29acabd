"""GPU: the dense method's skinny-GEMM dispatch with the real Triton kernel, and the start-up
tuning finding the new layer classes (dense linears and the LM head, not the embedding)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from pagedllm.config import EngineConfig  # noqa: E402
from pagedllm.layers.embedding import ParallelLMHead  # noqa: E402
from pagedllm.layers.linear import (  # noqa: E402
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from pagedllm.models.loader import load_model  # noqa: E402
from pagedllm.worker.linear_tuning import skinny_layers, tune_skinny_linears  # noqa: E402


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def test_tuning_sets_dispatch_and_outputs_agree() -> None:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = torch.nn.Sequential(
            MergedColumnParallelLinear(4096, [4096, 2048], params_dtype=torch.bfloat16),
            RowParallelLinear(6144, 4096, params_dtype=torch.bfloat16),
            ParallelLMHead(32000, 4096, params_dtype=torch.bfloat16),
        )
    for layer in model:
        layer.weight.data.normal_(0, layer.weight.shape[1] ** -0.5)
    tune_skinny_linears(model)
    assert all(layer.skinny_max_rows in (0, 1, 2, 4, 8, 16) for layer in model)
    x = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(F.linear(F.linear(x, model[0].weight), model[1].weight), model[2].weight)
    assert _rel_err(model(x), ref) < 2e-2


@pytest.mark.parametrize("m", [1, 5, 16, 17])
def test_forced_skinny_matches_f_linear(m: int) -> None:
    torch.manual_seed(0)
    with torch.device("cuda"):
        layer = QKVParallelLinear(1024, 128, 8, 2, bias=True, params_dtype=torch.bfloat16)
    layer.weight.data.normal_(0, 1024**-0.5)
    layer.bias.data.normal_()
    layer.skinny_max_rows = 16  # rows <= 16 take the Triton kernel, 17 takes cuBLAS
    x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
    assert _rel_err(layer(x), F.linear(x, layer.weight, layer.bias)) < 1e-2


def test_tuning_finds_model_layers(tiny_models: Any) -> None:
    path: Path = tiny_models("qwen3")  # tied LM head
    model = load_model(
        EngineConfig(model=str(path), device="cuda", dtype="bfloat16", load_format="dummy")
    )
    layers = skinny_layers(model)
    assert len(layers) == 4 * model.config.num_hidden_layers + 1 and layers[-1] is model.lm_head
    tune_skinny_linears(model)
    assert all(layer.skinny_max_rows in (0, 1, 2, 4, 8, 16) for layer in layers)
