"""GPU: the Triton KV write (``qkv_rope``) and paged attention with an fp8 (e4m3 / e5m2) KV
cache, against the torch-native reference (``kv_quant``'s ``clamp(x / scale)`` and
``float(x) * scale``) on fresh random inputs.

Tolerances: V bytes written by the kernel equal the reference's exactly (same rounding to the
activation dtype, IEEE division, round-to-nearest-even); K bytes may differ by one fp8 code on
at most 2% of the values, since the fused kernel's q/k-norm + rotary rounds like, but is not
bit-identical to, the separate PyTorch ops (the bf16 test of that kernel allows 1e-2). Attention
over the same fp8 cache agrees with the fp32 reference to 1e-2 relative (the bf16 tolerance of
the unquantized kernel test). Scales are far from 1 (and differ between K and V), so a kernel
that ignored a scale on write or on read fails by orders of magnitude.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from pagedllm.layers.attention.kv_quant import fp8_max, quantize_kv  # noqa: E402
from pagedllm.layers.attention.torch_native import TorchNativeBackend  # noqa: E402
from pagedllm.layers.rotary import RotaryEmbedding  # noqa: E402
from tests.kernels.test_paged_attention import CASES, _case  # noqa: E402

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
NAN_BYTE = 0x7F  # NaN in both e4m3fn and e5m2: poison for slots nothing may write


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _ref_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _code_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many fp8 codes apart a and b are (sign-magnitude bytes; opposite signs: far)."""
    ia, ib = a.view(torch.uint8).int(), b.view(torch.uint8).int()
    same_sign = (ia & 0x80) == (ib & 0x80)
    return torch.where(same_sign, (ia - ib).abs(), torch.full_like(ia, 255))


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "hq,hkv,d,norm",
    [(16, 8, 128, True), (32, 8, 128, False), (14, 2, 64, False), (12, 4, 96, True)],
)
def test_qkv_rope_store_fp8(fp8, dtype, hq, hkv, d, norm) -> None:  # type: ignore[no-untyped-def]
    from pagedllm.kernels.qkv_rope import qkv_rope_store

    torch.manual_seed(hq * d + hkv)
    t, block_size, num_blocks = 67, 16, 40
    rope = RotaryEmbedding(d, 8192, 1e6).cuda()
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device="cuda", dtype=dtype) * 3
    positions = torch.randint(0, 8192, (t,), device="cuda")
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:t]
    qw = torch.rand(d, device="cuda", dtype=dtype) + 0.5 if norm else None
    kw = torch.rand(d, device="cuda", dtype=dtype) + 0.5 if norm else None
    cache = torch.full(
        (2, num_blocks, block_size, hkv, d), NAN_BYTE, device="cuda", dtype=torch.uint8
    ).view(fp8)

    q, k, v = qkv.clone().split([hq * d, hkv * d, hkv * d], dim=-1)
    q, k, v = q.reshape(t, hq, d), k.reshape(t, hkv, d), v.reshape(t, hkv, d)
    if norm:
        q, k = _ref_norm(q, qw, 1e-6), _ref_norm(k, kw, 1e-6)
    cos, sin = rope.cos[positions].unsqueeze(1), rope.sin[positions].unsqueeze(1)
    q_ref, k_ref = rope._rotate(q, cos, sin), rope._rotate(k, cos, sin)
    # k's scale maps its amax to the fp8 maximum; v's is half that, so large |v| saturate.
    k_scale = k_ref.float().abs().max() / fp8_max(fp8)
    v_scale = v.float().abs().max() / fp8_max(fp8) / 2
    kv_scale = torch.stack([k_scale, v_scale]).float().cuda()

    out = qkv_rope_store(
        qkv, positions, rope.cos, rope.sin, cache, slots, hq, hkv, d, qw, kw, 1e-6, kv_scale
    )
    assert _rel(out, q_ref) < 1e-2  # q as without fp8
    flat = cache.view(2, -1, hkv, d)
    ref_k, ref_v = quantize_kv(k_ref, k_scale, fp8), quantize_kv(v, v_scale, fp8)
    assert torch.equal(flat[1, slots].view(torch.uint8), ref_v.view(torch.uint8))
    steps = _code_steps(flat[0, slots], ref_k)
    assert steps.max() <= 1 and (steps > 0).float().mean() < 0.02
    assert (flat[1, slots].float().abs() == fp8_max(fp8)).any()  # the clamp was exercised
    assert torch.isfinite(flat[:, slots].float()).all()
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert (flat[:, untouched].view(torch.uint8) == NAN_BYTE).all()


def _scales(k: torch.Tensor, v: torch.Tensor, fp8: torch.dtype) -> torch.Tensor:
    """(k_scale, v_scale): amax over fmax, times factors far from 1 and different for K, V."""
    return torch.stack(
        [k.float().abs().max() / fp8_max(fp8) * 3.0, v.float().abs().max() / fp8_max(fp8) * 0.7]
    ).float()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_attention_fp8_matches_torch_native(case, fp8, dtype) -> None:  # type: ignore[no-untyped-def]
    from pagedllm.layers.attention.triton_backend import TritonBackend

    q_lens, ctx_lens, hq, hkv, d, bs = case
    for seed in (0, 1):
        q, k, v, kv, meta = _case(q_lens, ctx_lens, hq, hkv, d, bs, dtype, seed)
        kv = kv * 20  # values well away from 1, so a dropped scale shows
        k, v = k * 20, v * 20
        kv_scale = _scales(kv[0], kv[1], fp8).cuda()
        cache = torch.empty(kv.shape, dtype=fp8, device="cuda")
        cache[0], cache[1] = (
            quantize_kv(kv[0], kv_scale[0], fp8),
            quantize_kv(kv[1], kv_scale[1], fp8),
        )
        scale = d**-0.5
        ref_backend = TorchNativeBackend(hq, hkv, d, scale)
        ref_cache = cache.clone()
        ref = ref_backend.forward(
            q, k, v, ref_cache, ref_backend.build_metadata(meta), kv_scale
        ).float()
        backend = TritonBackend(hq, hkv, d, scale)
        out = backend.forward(q, k, v, cache, backend.build_metadata(meta), kv_scale).float()
        assert torch.isfinite(out).all()
        assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))
        err = _rel(out, ref)
        assert err < 1e-2, f"relative error {err:.2e}"


@pytest.mark.parametrize("fp8", FP8)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_forward_qkv_fp8(fp8, qk_norm) -> None:  # type: ignore[no-untyped-def]
    """The Triton backend's fused path (write kernel + attention) against the torch backend's
    separate ops, both writing and reading an fp8 cache with the same scales."""
    from pagedllm.layers.attention.triton_backend import TritonBackend
    from pagedllm.layers.norm import RMSNorm
    from tests.layers.attention.test_triton_backend import _common

    torch.manual_seed(0)
    dev, dtype = torch.device("cuda"), torch.bfloat16
    hq, hkv, d, bs = 16, 4, 64, 16
    common, num_blocks, seq_lens = _common([33, 1, 1, 7], [0, 40, 100, 20], bs, dev)
    triton_be, ref_be = TritonBackend(hq, hkv, d, d**-0.5), TorchNativeBackend(hq, hkv, d, d**-0.5)
    context = torch.randn(2, num_blocks, bs, hkv, d, device=dev) * 4
    kv_scale = torch.tensor([0.031, 0.017], device=dev)
    cache = torch.empty(context.shape, dtype=fp8, device=dev)
    cache[0] = quantize_kv(context[0], kv_scale[0], fp8)
    cache[1] = quantize_kv(context[1], kv_scale[1], fp8)
    ref_cache = cache.clone()
    t = common.query_start_loc_cpu[-1]
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=dev, dtype=dtype) * 4
    positions = torch.cat(
        [torch.arange(s - q, s) for s, q in zip(seq_lens, [33, 1, 1, 7], strict=True)]
    ).to(dev)
    rotary = RotaryEmbedding(d, 4096, 10000.0).to(dev)
    norms = (RMSNorm(d).to(dev, dtype), RMSNorm(d).to(dev, dtype)) if qk_norm else (None, None)
    for norm in norms:
        if norm is not None:
            norm.weight.data.uniform_(0.5, 1.5)
    ref = ref_be.forward_qkv(
        qkv.clone(), positions, rotary, *norms, ref_cache, ref_be.build_metadata(common), kv_scale
    )
    out = triton_be.forward_qkv(
        qkv.clone(), positions, rotary, *norms, cache, triton_be.build_metadata(common), kv_scale
    )
    steps = _code_steps(cache, ref_cache)
    assert steps.max() <= 1 and (steps > 0).float().mean() < 0.02
    rel = _rel(out, ref)
    assert rel < 2e-2, f"output relative error {rel:.2e}"


def test_cuda_graph_reads_scales_in_place() -> None:
    """A captured decode replays with the scale tensor's current values: doubling v_scale in
    place doubles the output, and a new k_scale matches an eager run with it."""
    from pagedllm.kernels.paged_attention import paged_attention

    fp8 = torch.float8_e4m3fn
    q, _, _, kv, meta = _case([1, 1, 1], [700, 33, 2000], 32, 8, 128, 16, torch.bfloat16, 5)
    kv_scale = torch.tensor([0.01, 0.02], device="cuda")
    cache = torch.empty(kv.shape, dtype=fp8, device="cuda")
    cache[0], cache[1] = quantize_kv(kv[0], kv_scale[0], fp8), quantize_kv(kv[1], kv_scale[1], fp8)
    out = torch.empty_like(q)

    def run(o: torch.Tensor) -> torch.Tensor:
        return paged_attention(
            q, cache, o, meta.block_tables, meta.seq_lens, meta.query_start_loc, 128**-0.5,
            decode=True, num_splits=4, kv_scale=kv_scale,
        )  # fmt: skip

    run(out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(out)
    graph.replay()
    base = out.float().clone()
    kv_scale[1] *= 2
    graph.replay()
    assert torch.allclose(out.float(), 2 * base, rtol=1e-2, atol=1e-3)
    kv_scale[0] = 0.003
    graph.replay()
    eager = run(torch.empty_like(q)).float()
    assert torch.equal(out.float(), eager)
    assert _rel(out, base) > 1e-2  # the new k_scale changed the softmax
