"""GPU: the Triton backend's typed metadata and its fused forward_qkv (q/k norm + rotary + KV
write in one kernel) against the torch-native backend's separate ops."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from pagedllm.core.kv_cache_spec import KVCacheSpec  # noqa: E402
from pagedllm.layers.attention.metadata import AttentionMetadata  # noqa: E402
from pagedllm.layers.attention.torch_native import TorchNativeBackend  # noqa: E402
from pagedllm.layers.norm import RMSNorm  # noqa: E402
from pagedllm.layers.rotary import RotaryEmbedding  # noqa: E402


def _common(q_lens: list[int], ctx_lens: list[int], bs: int, dev: torch.device):  # type: ignore[no-untyped-def]
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens, strict=True)]
    tables, slots, first = [], [], 0
    for q_len, s in zip(q_lens, seq_lens, strict=True):
        t = list(range(first, first + -(-s // bs)))
        first += len(t)
        tables.append(t)
        slots += [t[p // bs] * bs + p % bs for p in range(s - q_len, s)]
    width = max(map(len, tables))
    qsl = [0]
    for q_len in q_lens:
        qsl.append(qsl[-1] + q_len)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=dev),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_tables=torch.tensor(
            [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev
        ),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
    )
    return meta, first, seq_lens


def test_triton_metadata() -> None:
    from pagedllm.layers.attention.triton_backend import (
        TritonBackend,
        TritonMetadata,
        decode_num_splits,
    )

    dev = torch.device("cuda")
    backend = TritonBackend(32, 8, 128, 128**-0.5)
    assert backend.supports_cuda_graphs
    mixed, _, _ = _common([5, 1, 70], [0, 9, 3], 16, dev)
    meta = backend.build_metadata(mixed)
    assert isinstance(meta, TritonMetadata) and not meta.decode and meta.num_splits == 1
    assert meta.programs is not None and meta.programs[0].device.type == "cuda"
    assert meta.slot_mapping is mixed.slot_mapping
    # A CUDA-graph bucket: no host lists, B from the tensor shape, max_seq_len = the limit.
    graph_like = AttentionMetadata(
        slot_mapping=torch.zeros(4, dtype=torch.int64, device=dev),
        query_start_loc=torch.arange(5, dtype=torch.int32, device=dev),
        seq_lens=torch.ones(4, dtype=torch.int32, device=dev),
        block_tables=torch.zeros(4, 8, dtype=torch.int32, device=dev),
        max_query_len=1,
        max_seq_len=4096,
        query_start_loc_cpu=[],
        seq_lens_cpu=[],
    )
    meta = backend.build_metadata(graph_like)
    assert meta.decode and meta.programs is None
    assert meta.num_splits == decode_num_splits(4, 8, 4096, backend.num_sms)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_fused_forward_qkv_matches_torch_native(dtype, qk_norm) -> None:  # type: ignore[no-untyped-def]
    from pagedllm.layers.attention.triton_backend import TritonBackend

    torch.manual_seed(0)
    dev = torch.device("cuda")
    hq, hkv, d, bs = 16, 4, 64, 16
    common, num_blocks, seq_lens = _common([33, 1, 1, 7], [0, 40, 100, 20], bs, dev)
    spec = KVCacheSpec(
        num_layers=1, block_size=bs, num_kv_heads=hkv, head_dim=d, dtype=str(dtype)[6:]
    )
    triton_be, ref_be = TritonBackend(hq, hkv, d, d**-0.5), TorchNativeBackend(hq, hkv, d, d**-0.5)
    (cache,) = triton_be.allocate_kv_cache(num_blocks, spec, dev)
    cache.normal_()  # the cached context
    ref_cache = cache.clone()
    t = common.query_start_loc_cpu[-1]
    qkv = torch.randn(t, (hq + 2 * hkv) * d, device=dev, dtype=dtype)
    positions = torch.cat(
        [torch.arange(s - q, s) for s, q in zip(seq_lens, [33, 1, 1, 7], strict=True)]
    )
    positions = positions.to(dev)
    rotary = RotaryEmbedding(d, 4096, 10000.0).to(dev)
    norms = (RMSNorm(d).to(dev, dtype), RMSNorm(d).to(dev, dtype)) if qk_norm else (None, None)
    for norm in norms:
        if norm is not None:
            norm.weight.data.uniform_(0.5, 1.5)
    ref = ref_be.forward_qkv(
        qkv.clone(), positions, rotary, *norms, ref_cache, ref_be.build_metadata(common)
    )
    out = triton_be.forward_qkv(
        qkv.clone(), positions, rotary, *norms, cache, triton_be.build_metadata(common)
    )
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    rel = ((cache.float() - ref_cache.float()).norm() / ref_cache.float().norm()).item()
    assert rel < tol, f"KV cache relative error {rel:.2e}"
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < tol, f"output relative error {rel:.2e}"
