"""GPU: fused RMSNorm / rotary / SiLU*mul kernels against the PyTorch layer code."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from pagedllm.kernels.elementwise import rms_norm, rotary_, silu_and_mul  # noqa: E402
from pagedllm.layers.rotary import RotaryEmbedding  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _ref_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 4096), (37, 3584), (513, 64), (3, 7, 128)])
def test_rms_norm(dtype, shape) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(shape, device="cuda", dtype=dtype)
    w = torch.rand(shape[-1], device="cuda", dtype=dtype) + 0.5
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert _rel(rms_norm(x, w, 1e-6), _ref_norm(x, w, 1e-6)) < tol
    res = torch.randn_like(x)
    ref_res = x + res
    out = rms_norm(x, w, 1e-6, res)
    assert _rel(res, ref_res) < tol  # residual updated in place
    assert _rel(out, _ref_norm(ref_res, w, 1e-6)) < tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,d", [(1, 11008), (45, 14336), (300, 96)])
def test_silu_and_mul(dtype, rows, d) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(rows, 2 * d, device="cuda", dtype=dtype)
    ref = torch.nn.functional.silu(x[:, :d]) * x[:, d:]
    out = torch.full_like(ref, float("nan"))
    out = silu_and_mul(x)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,d", [(32, 128), (14, 64), (8, 96)])
def test_rotary(dtype, heads, d) -> None:  # type: ignore[no-untyped-def]
    rope = RotaryEmbedding(
        d,
        4096,
        500000.0,
        {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 1024},
    ).cuda()
    t = 77
    base = torch.randn(t, heads + 4, d, device="cuda", dtype=dtype)
    q = base[:, :heads]  # a strided view, as the model passes it
    pos = torch.randint(0, 4096, (t,), device="cuda")
    cos, sin = rope.cos[pos].unsqueeze(1), rope.sin[pos].unsqueeze(1)
    ref = RotaryEmbedding._rotate(q.clone(), cos, sin)
    untouched = base[:, heads:].clone()
    rotary_(q, pos, rope.cos, rope.sin)
    assert _rel(q, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.equal(base[:, heads:], untouched)
