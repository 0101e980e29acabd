"""The torch-native backend on CPU: typed metadata, cache allocation, and that writing + attending
over the paged cache equals dense causal attention; the layer only delegates to the backend."""

from __future__ import annotations

import random

import pytest
import torch

from pagedllm.core.kv_cache_spec import KVCacheSpec
from pagedllm.layers.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    get_backend_cls,
)
from pagedllm.layers.attention.layer import Attention
from pagedllm.layers.attention.torch_native import TorchNativeBackend, TorchNativeMetadata
from pagedllm.layers.norm import RMSNorm
from pagedllm.layers.rotary import RotaryEmbedding

HQ, HKV, D, BS = 4, 2, 8, 4


def _common(q_lens: list[int], ctx_lens: list[int], num_blocks: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """Shared metadata for sequences with ``ctx_lens`` cached tokens and ``q_lens`` new ones."""
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens, strict=True)]
    tables, slots, ctx_slots = [], [], []
    for q_len, s in zip(q_lens, seq_lens, strict=True):
        t = [free.pop() for _ in range(-(-s // BS))]
        tables.append(t)
        where = [t[p // BS] * BS + p % BS for p in range(s)]
        ctx_slots.append(where[: s - q_len])
        slots += where[s - q_len :]
    qsl = [0]
    for q_len in q_lens:
        qsl.append(qsl[-1] + q_len)
    width = max(map(len, tables))
    common = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
    )
    return common, ctx_slots


def test_typed_metadata() -> None:
    common, _ = _common([1, 5, 1, 3], [4, 0, 17, 2], num_blocks=20)
    meta = TorchNativeBackend(HQ, HKV, D, 1.0).build_metadata(common)
    assert isinstance(meta, TorchNativeMetadata) and isinstance(meta, AttentionMetadata)
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        assert getattr(meta, name) is getattr(common, name)  # shared, not copied
    assert (meta.max_query_len, meta.max_seq_len, meta.num_seqs) == (5, 18, 4)
    assert meta.decode_seqs == [0, 2] and meta.prefill_seqs == [1, 3]
    assert meta.decode_rows is not None and meta.decode_idx is not None
    assert meta.decode_rows.tolist() == [0, 6] and meta.decode_idx.tolist() == [0, 2]

    only_prefill = TorchNativeBackend(HQ, HKV, D, 1.0).build_metadata(_common([3], [0], 4)[0])
    assert only_prefill.decode_seqs == [] and only_prefill.decode_rows is None


def test_attend_needs_its_own_metadata() -> None:
    common, _ = _common([1], [3], num_blocks=2)
    backend = TorchNativeBackend(HQ, HKV, D, 1.0)
    cache = torch.zeros(2, 2, BS, HKV, D)
    with pytest.raises(AssertionError, match="not built by this backend"):
        backend.attend(torch.zeros(1, HQ, D), cache, common)


def test_allocate_kv_cache() -> None:
    backend = TorchNativeBackend(HQ, HKV, D, 1.0)
    spec = KVCacheSpec(num_layers=3, block_size=BS, num_kv_heads=HKV, head_dim=D, dtype="float16")
    caches = backend.allocate_kv_cache(5, spec, torch.device("cpu"))
    assert len(caches) == 3
    for c in caches:
        assert c.shape == (2, 5, BS, HKV, D) and c.dtype == torch.float16
        assert not c.any()
    assert sum(c.numel() * c.element_size() for c in caches) == 5 * spec.bytes_per_block
    with pytest.raises(ValueError, match="does not match"):
        backend.allocate_kv_cache(5, KVCacheSpec(3, BS, HKV * 2, D, "float16"), torch.device("cpu"))


def test_registry() -> None:
    cls = get_backend_cls("auto", torch.device("cpu"))
    assert cls is TorchNativeBackend and cls.name == "torch_native"
    assert not cls.supports_cuda_graphs  # reads host lists every step
    with pytest.raises(ValueError, match="Unknown attention backend"):
        get_backend_cls("nope", torch.device("cpu"))


def _dense(q, keys, vals, scale):  # type: ignore[no-untyped-def]
    """Causal attention of the last len(q) positions over keys/vals [S, Hkv, D], in fp64."""
    s, lq = keys.shape[0], q.shape[0]
    k = keys.double().repeat_interleave(HQ // HKV, dim=1)
    v = vals.double().repeat_interleave(HQ // HKV, dim=1)
    scores = torch.einsum("qhd,shd->hqs", q.double(), k) * scale
    mask = torch.arange(s)[None, :] > torch.arange(s - lq, s)[:, None]
    probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    return torch.einsum("hqs,shd->qhd", probs, v)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forward_matches_dense_attention(seed: int) -> None:
    q_lens, ctx_lens = [1, 7, 1, 4, 1], [0, 0, 9, 5, 30]
    num_blocks = 30
    common, ctx_slots = _common(q_lens, ctx_lens, num_blocks, seed)
    torch.manual_seed(seed)
    cache = torch.randn(2, num_blocks, BS, HKV, D)  # context already cached, the rest garbage
    t = sum(q_lens)
    q, k, v = torch.randn(t, HQ, D), torch.randn(t, HKV, D), torch.randn(t, HKV, D)
    backend = TorchNativeBackend(HQ, HKV, D, D**-0.5)
    ref_cache = cache.clone()
    out = backend.forward(q, k, v, cache, backend.build_metadata(common))
    flat, ref_flat = cache.view(2, -1, HKV, D), ref_cache.view(2, -1, HKV, D)
    assert torch.equal(flat[0, common.slot_mapping], k) and torch.equal(
        flat[1, common.slot_mapping], v
    )
    untouched = torch.ones(flat.shape[1], dtype=torch.bool)
    untouched[common.slot_mapping] = False
    assert torch.equal(flat[:, untouched], ref_flat[:, untouched])  # wrote only its slots
    qsl = common.query_start_loc_cpu
    for i, ctx in enumerate(ctx_slots):
        rows = slice(qsl[i], qsl[i + 1])
        keys = torch.cat([ref_flat[0, ctx], k[rows]])
        vals = torch.cat([ref_flat[1, ctx], v[rows]])
        ref = _dense(q[rows], keys, vals, D**-0.5)
        assert torch.allclose(out[rows].double(), ref, atol=1e-5), f"sequence {i}"


class _CountingBackend(TorchNativeBackend):
    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.writes = 0

    def write_kv(self, kv_cache, k, v, slot_mapping, kv_scale=None) -> None:  # type: ignore[no-untyped-def]
        self.writes += 1
        super().write_kv(kv_cache, k, v, slot_mapping, kv_scale)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_layer_delegates_to_backend(qk_norm: bool) -> None:
    """forward_qkv = split, (q/k norm), rotary, then the backend writes the cache and attends."""
    torch.manual_seed(0)
    common, _ = _common([3, 1], [0, 6], num_blocks=6)
    backend = _CountingBackend(HQ, HKV, D, D**-0.5)
    layer = Attention(HQ, HKV, D, D**-0.5)
    layer.backend = backend
    spec = KVCacheSpec(num_layers=1, block_size=BS, num_kv_heads=HKV, head_dim=D, dtype="float32")
    (layer.kv_cache,) = backend.allocate_kv_cache(6, spec, torch.device("cpu"))
    rotary = RotaryEmbedding(D, 64, 10000.0)
    norms = (RMSNorm(D), RMSNorm(D)) if qk_norm else (None, None)
    t = 4
    qkv = torch.randn(t, (HQ + 2 * HKV) * D)
    positions = torch.tensor([0, 1, 2, 6])
    meta = backend.build_metadata(common)
    out = layer.forward_qkv(qkv, positions, rotary, *norms, meta)
    assert backend.writes == 1 and out.shape == (t, HQ, D)

    q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)
    q, k, v = q.view(t, HQ, D), k.view(t, HKV, D), v.view(t, HKV, D)
    if qk_norm:
        q, k = norms[0](q), norms[1](k)  # type: ignore[misc]
    q, k = rotary(positions, q, k)
    ref_cache = torch.zeros_like(layer.kv_cache)
    ref = TorchNativeBackend(HQ, HKV, D, D**-0.5).forward(q, k, v, ref_cache, meta)
    assert torch.equal(out, ref) and torch.equal(layer.kv_cache, ref_cache)


def test_backend_is_abstract() -> None:
    with pytest.raises(TypeError):
        AttentionBackend(HQ, HKV, D, 1.0)  # type: ignore[abstract]
