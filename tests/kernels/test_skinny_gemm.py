"""GPU: the skinny GEMM against F.linear, and the start-up dispatch measurement."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from pagedllm.kernels.skinny_gemm import skinny_linear  # noqa: E402
from pagedllm.layers.linear import MergedColumnParallelLinear, RowParallelLinear  # noqa: E402
from pagedllm.worker.linear_tuning import tune_skinny_linears  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("n,k,bias", [(4096, 4096, False), (1000, 2000, True), (24, 136, False)])
def test_skinny_linear(dtype, m, n, k, bias) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    ref = F.linear(x.float(), w.float(), b.float() if b is not None else None)
    out = skinny_linear(x, w, b)
    assert out.shape == (m, n) and out.dtype == dtype
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_tuning_sets_dispatch_and_outputs_agree() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        MergedColumnParallelLinear(4096, [4096, 2048]), RowParallelLinear(6144, 4096)
    ).to("cuda", torch.bfloat16)
    for layer in model:  # the layers allocate with torch.empty: give them nn.Linear's init
        bound = layer.weight.shape[1] ** -0.5
        torch.nn.init.uniform_(layer.weight, -bound, bound)
    tune_skinny_linears(model)
    for layer in model:
        assert layer.skinny_max_rows in (0, 1, 2, 4, 8, 16)
    x = torch.randn(2, 4096, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(F.linear(x, model[0].weight), model[1].weight)
    out = model(x)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
