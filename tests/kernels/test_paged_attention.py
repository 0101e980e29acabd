"""GPU: the Triton paged-attention kernel against the torch-native backend (fresh random data)."""

from __future__ import annotations

import random

import pytest
import torch

pytestmark = pytest.mark.gpu
triton = pytest.importorskip("triton")

from pagedllm.layers.attention.backend import AttentionMetadata  # noqa: E402
from pagedllm.layers.attention.torch_native import TorchNativeBackend  # noqa: E402


def _case(q_lens, ctx_lens, hq, hkv, d, block_size, dtype, seed):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    rng = random.Random(seed)
    dev = torch.device("cuda")
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens, strict=True)]
    num_blocks = sum(-(-s // block_size) for s in seq_lens) + 3
    kv = torch.randn(2, num_blocks, block_size, hkv, d, device=dev, dtype=dtype)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, slots = [], []
    for q_len, s in zip(q_lens, seq_lens, strict=True):
        t = [free.pop() for _ in range(-(-s // block_size))]
        tables.append(t)
        slots += [t[p // block_size] * block_size + p % block_size for p in range(s - q_len, s)]
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
    t = qsl[-1]
    q = torch.randn(t, hq, d, device=dev, dtype=dtype)
    k = torch.randn(t, hkv, d, device=dev, dtype=dtype)
    v = torch.randn(t, hkv, d, device=dev, dtype=dtype)
    return q, k, v, kv, meta


CASES = [
    # q_lens, ctx_lens, hq, hkv, d, block_size
    ([1, 1, 1, 1], [0, 15, 16, 1000], 32, 8, 128, 16),  # decode, block boundaries, long ctx
    ([1] * 3, [5000, 17, 3], 8, 1, 64, 16),  # MQA, very long context at tiny batch
    ([37, 1, 128, 5], [0, 40, 16, 300], 32, 8, 128, 16),  # mixed prefill chunks + decode
    ([200, 1], [33, 7], 16, 16, 64, 32),  # MHA, block 32
    ([19, 3], [0, 64], 14, 2, 64, 16),  # group 7 (odd), Qwen-like
    ([65, 1, 9], [1, 2, 130], 16, 8, 96, 16),  # odd head dim 96
    ([7, 1], [10, 90], 32, 4, 128, 64),  # block 64
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_torch_native(case, dtype) -> None:  # type: ignore[no-untyped-def]
    from pagedllm.layers.attention.triton_backend import TritonBackend

    q_lens, ctx_lens, hq, hkv, d, bs = case
    for seed in (0, 1):
        q, k, v, kv, meta = _case(q_lens, ctx_lens, hq, hkv, d, bs, dtype, seed)
        scale = d**-0.5
        ref_kv = kv.clone()
        ref_backend = TorchNativeBackend(hq, hkv, d, scale)
        ref = ref_backend.forward(q, k, v, ref_kv, ref_backend.build_metadata(meta)).float()
        backend = TritonBackend(hq, hkv, d, scale)
        out_kv = kv.clone()
        out = backend.forward(q, k, v, out_kv, backend.build_metadata(meta)).float()
        assert torch.isfinite(out).all()
        assert torch.equal(out_kv, ref_kv)  # the KV write landed in the same slots
        err = (out - ref).norm() / ref.norm()
        assert err < 1e-2, f"relative error {err:.2e}"


def test_decode_splits_agree() -> None:
    from pagedllm.kernels.paged_attention import paged_attention

    q, k, v, kv, meta = _case([1, 1], [3000, 700], 32, 8, 128, 16, torch.bfloat16, 3)
    kv[0].view(-1, 8, 128)[meta.slot_mapping] = k
    kv[1].view(-1, 8, 128)[meta.slot_mapping] = v
    outs = []
    for splits in (1, 4, 16):
        out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
        paged_attention(
            q,
            kv,
            out,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            128**-0.5,
            decode=True,
            num_splits=splits,
        )
        assert torch.isfinite(out).all()
        outs.append(out.float())
    for o in outs[1:]:
        assert (o - outs[0]).norm() / outs[0].norm() < 5e-3
