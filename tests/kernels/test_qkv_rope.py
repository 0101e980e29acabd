"""GPU: the fused q/k-norm + rotary + KV-cache-write kernel against the separate PyTorch layers."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from pagedllm.kernels.qkv_rope import qkv_rope_store  # noqa: E402
from pagedllm.layers.rotary import RotaryEmbedding  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _ref_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "hq,hkv,d,norm",
    [
        (16, 8, 128, True),
        (32, 8, 128, False),
        (14, 2, 64, False),
        (12, 4, 96, True),
        (4, 4, 80, True),
    ],
)
def test_qkv_rope_store(dtype, hq, hkv, d, norm) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    t, block_size, num_blocks = 67, 16, 40
    rope = RotaryEmbedding(d, 8192, 1e6).cuda()
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device="cuda", dtype=dtype)
    positions = torch.randint(0, 8192, (t,), device="cuda")
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:t]
    qw = torch.rand(d, device="cuda", dtype=dtype) + 0.5 if norm else None
    kw = torch.rand(d, device="cuda", dtype=dtype) + 0.5 if norm else None
    cache = torch.full(
        (2, num_blocks, block_size, hkv, d), float("nan"), device="cuda", dtype=dtype
    )

    q, k, v = qkv.clone().split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.reshape(t, hq, d), k.reshape(t, hkv, d), v.reshape(t, hkv, d)
    if norm:
        q, k = _ref_norm(q, qw, 1e-6), _ref_norm(k, kw, 1e-6)
    cos, sin = rope.cos[positions].unsqueeze(1), rope.sin[positions].unsqueeze(1)
    q_ref, k_ref = rope._rotate(q, cos, sin), rope._rotate(k, cos, sin)

    out = qkv_rope_store(qkv, positions, rope.cos, rope.sin, cache, slots, hq, hkv, d, qw, kw, 1e-6)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert out.data_ptr() == qkv.data_ptr()  # q rotated in place
    assert _rel(out, q_ref) < tol
    flat = cache.view(2, -1, hkv, d)
    assert _rel(flat[0, slots], k_ref) < tol
    assert torch.equal(flat[1, slots], v)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert flat[:, untouched].isnan().all()  # nothing written outside the slots
