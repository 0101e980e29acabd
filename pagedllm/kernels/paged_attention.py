"""Triton paged attention over block tables, for mixed prefill/decode batches.

One kernel serves both shapes of work:

* **mixed** (any query lengths): a program owns ``BLOCK_Q`` query tokens of one sequence and
  all query heads of one KV head (GQA rows are packed: row = token * GROUP_P + head), walks
  the sequence's KV blocks up to its causal limit with an online softmax, and writes the
  output. Programs are listed by (sequence, first query token) tables built per step.
* **decode** (every query length is 1): program (seq, kv_head, split) covers one slice of the
  context (flash-decoding), so long contexts at small batch still fill the GPU; a second
  kernel merges the splits. Shapes depend only on the batch size, so it can be captured in a
  CUDA graph.

KV cache layout per layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]``. An fp8
cache (e4m3 or e5m2, ``layers/attention/kv_quant.py``) holds ``x / scale``: each tile is
widened to q's dtype as it is loaded (exact: every fp8 value is a bf16/fp16 value), k_scale is
folded into the softmax scale and v_scale into the accumulator, so the scales cost two loads
per program and the cache bytes read are halved. The scales come from a [2] float32 device
tensor (k, v), so a captured CUDA graph reads their current values.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


# Triton compiles a variant per "== 1" / "% 16 == 0" value of each int argument: the block
# table's width changes every mixed step, so specializing on it would recompile mid-run.
@triton.jit(do_not_specialize=["stride_bt", "scale_log2"])
def _attn_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    part_acc_ptr, part_ml_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_ptr, prog_seq_ptr, prog_q_ptr,
    kv_scale_ptr, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cb, stride_cs, stride_ch, stride_bt,
    HQ: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
    D: tl.constexpr, D_P: tl.constexpr, CACHE_BLOCK: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DECODE: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:
        seq = pid
        q_first = 0
    else:
        seq = tl.load(prog_seq_ptr + pid)
        q_first = tl.load(prog_q_ptr + pid)
    q0 = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q0
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx = seq_len - q_len

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
    rows = tl.arange(0, BLOCK_M)
    tok = q_first + rows // GROUP_P
    hh = rows % GROUP_P
    row_ok = (tok < q_len) & (hh < GROUP)
    head = kvh * GROUP + hh
    d = tl.arange(0, D_P)
    d_ok = d < D
    q_off = (q0 + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = ctx + tok

    kv_end = ctx + tl.minimum(q_first + BLOCK_Q, q_len)
    if NUM_SPLITS > 1:
        chunk = tl.cdiv(tl.cdiv(kv_end, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, kv_end)
    else:
        lo = 0
        hi = kv_end

    qk_scale = scale_log2
    if KV_FP8:  # scores of dequantized keys: q . (k * k_scale)
        qk_scale = scale_log2 * tl.load(kv_scale_ptr)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_P], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        blk = tl.load(block_tables_ptr + seq * stride_bt + n // CACHE_BLOCK, mask=n_ok, other=0)
        kv_off = blk.to(tl.int64) * stride_cb + (n % CACHE_BLOCK) * stride_cs + kvh * stride_ch
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:
            k = k.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(n_ok[None, :] & (n[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if KV_FP8:
            v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    if KV_FP8:  # sum p * (v * v_scale); split partials merge linearly
        acc = acc * tl.load(kv_scale_ptr + 1)

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_off = (q0 + tok)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(
            out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :]
        )
    else:
        # Partials per (token, head, split): acc [D], and (max, sum) in log2 space.
        base = ((q0 + tok) * HQ + head) * NUM_SPLITS + split
        tl.store(part_acc_ptr + base[:, None] * D_P + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + base * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + base * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr, part_ml_ptr, out_ptr, stride_ot, stride_oh,
    HQ: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr, NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    h = tl.program_id(1)
    base = (t * HQ + h) * NUM_SPLITS
    s = tl.arange(0, NUM_SPLITS)
    m = tl.load(part_ml_ptr + (base + s) * 2)
    l_ = tl.load(part_ml_ptr + (base + s) * 2 + 1)
    m_max = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))
    d = tl.arange(0, D_P)
    acc = tl.load(part_acc_ptr + (base + s)[:, None] * D_P + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l_ * w, 0)
    tl.store(
        out_ptr + t * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < D
    )


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_tile(num_programs: int, device: torch.device) -> tuple[int, int]:
    """(KV tokens per iteration, pipeline stages) for a decode launch of (seq, kv head) pairs.

    H100 sweep: 4 stages read the KV at 2.97-2.99 TB/s at large batch (2 stages: 2.87);
    when there are fewer (seq, head) pairs than SMs, 128-token tiles (with more splits)
    cut batch-1 attention from 8 to 6 µs per layer.
    """
    return (128 if num_programs < num_sms(device) else 64), 4


def _group_pad(group: int) -> int:
    return max(triton.next_power_of_2(group), 1)


def mixed_programs(
    query_start_loc_cpu: list[int], block_q: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, first query token) of every program for a mixed batch.

    Both come from one [2, n] buffer whose row length is padded to a multiple of 4, so the
    second row stays 16-byte aligned (Triton specializes on pointer alignment).
    """
    seqs: list[int] = []
    firsts: list[int] = []
    for i in range(len(query_start_loc_cpu) - 1):
        q_len = query_start_loc_cpu[i + 1] - query_start_loc_cpu[i]
        for first in range(0, q_len, block_q):
            seqs.append(i)
            firsts.append(first)
    n = len(seqs)
    pad = [0] * (-n % 4)
    both = torch.tensor([seqs + pad, firsts + pad], dtype=torch.int32)
    if device.type == "cuda":
        both = both.pin_memory()
    both = both.to(device, non_blocking=True)
    return both[0, :n], both[1, :n]


def mixed_block_q(num_heads: int, num_kv_heads: int) -> int:
    """Query tokens per program in mixed mode: 64 packed (token, head) rows, or one token."""
    return max(1, 64 // _group_pad(num_heads // num_kv_heads))


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    out: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    *,
    decode: bool,
    num_splits: int = 1,
    programs: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``q`` [T, Hq, D] over the paged context; writes and returns ``out``.

    An fp8 ``kv_cache`` needs ``kv_scale``, the layer's [2] float32 (k_scale, v_scale) on the
    device; the cache values are read as ``float(x) * scale``.

    ``decode=True`` needs every query length to be 1 (program i = sequence i) and may split
    the context ``num_splits`` ways. Otherwise ``programs`` (from ``mixed_programs``) lists
    the work and ``num_splits`` must be 1. ``block_n``/``num_stages`` default to what
    ``benchmarks/attn_sweep.py`` measured best on an H100 (see ``decode_tile``).
    """
    t, hq, d = q.shape
    _, _, cache_block, hkv, _ = kv_cache.shape
    group = hq // hkv
    gp = _group_pad(group)
    d_p = triton.next_power_of_2(d)
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    kv_fp8 = kv_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    if kv_fp8:
        assert kv_scale is not None and kv_scale.dtype == torch.float32, "fp8 needs kv_scale"
        assert kv_scale.numel() == 2 and kv_scale.device == q.device
    if decode:
        tile, stages = decode_tile(seq_lens.shape[0] * hkv, q.device)
        block_n = block_n or tile
        num_stages = num_stages or stages
        block_q = 1
        gp = max(gp, 16)  # tl.dot needs >= 16 rows
        grid = (seq_lens.shape[0], hkv, num_splits)
        prog_seq = prog_q = seq_lens  # unused
    else:
        assert programs is not None and num_splits == 1
        block_q = mixed_block_q(hq, hkv)  # block_q * gp >= 64 rows
        block_n = block_n or 64
        num_stages = num_stages or 2
        prog_seq, prog_q = programs
        grid = (prog_seq.shape[0], hkv, 1)
    if num_splits > 1:
        part_acc = torch.empty((t, hq, num_splits, d_p), dtype=torch.float32, device=q.device)
        part_ml = torch.empty((t, hq, num_splits, 2), dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out
    _attn_kernel[grid](
        q, k_cache, v_cache, out, part_acc, part_ml,
        block_tables, seq_lens, query_start_loc, prog_seq, prog_q,
        kv_scale if kv_fp8 else seq_lens, scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        HQ=hq, GROUP=group, GROUP_P=gp, D=d, D_P=d_p, CACHE_BLOCK=cache_block,
        BLOCK_Q=block_q, BLOCK_N=block_n, NUM_SPLITS=num_splits, DECODE=decode,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", KV_FP8=kv_fp8,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if num_splits > 1:
        _merge_splits_kernel[(t, hq)](
            part_acc, part_ml, out, out.stride(0), out.stride(1),
            HQ=hq, D=d, D_P=d_p, NUM_SPLITS=num_splits,
        )  # fmt: skip
    return out
