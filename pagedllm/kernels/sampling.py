"""Gumbel-max sampling in one pass over the logits (Triton).

``argmax(x / T + G)`` with ``G ~ Gumbel(0, 1)`` i.i.d. per token is an exact draw from
``softmax(x / T)``, so a random row needs no softmax, no normalisation and no noise tensor:
each program reads one slice of a row once, adds noise from Triton's counter-based Philox
generator and keeps the slice's best (value, index); a tiny torch reduction picks each row's
winner among its slices. Greedy rows skip the noise and get the plain argmax.

Used for batches without top-k / top-p / min-p, penalties, min_tokens or per-request
seeds (those keep the general sampler path); at a 152k vocabulary and 256 rows this replaces
about 1.5 GB of memory traffic (fp32 softmax, noise, division, argmax) with one 155 MB read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SLICE = 8192
_U_MAX = 0.99999994  # largest fp32 below 1: keeps -log(-log(u)) finite


@triton.jit(do_not_specialize=["seed"])
def _gumbel_argmax_kernel(
    logits_ptr, temp_ptr, greedy_ptr, val_ptr, idx_ptr, seed, vocab, stride_row, num_slices,
    HAS_TEMP: tl.constexpr, SLICE: tl.constexpr, BLOCK: tl.constexpr, U_MAX: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    part = tl.program_id(1)
    greedy = tl.load(greedy_ptr + row)
    inv_t = 1.0
    if HAS_TEMP:
        inv_t = 1.0 / tl.load(temp_ptr + row)
    best_v = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32)
    base = logits_ptr + row.to(tl.int64) * stride_row
    stream = seed.to(tl.int64) * 1048576 + row  # one Philox stream per (step, row)
    for start in range(part * SLICE, tl.minimum(part * SLICE + SLICE, vocab), BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < vocab
        x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32)
        if not greedy:
            u = tl.minimum(tl.rand(stream, cols), U_MAX)
            x = x * inv_t - tl.log(-tl.log(u))
        x = tl.where(ok, x, float("-inf"))
        better = x > best_v
        best_v = tl.where(better, x, best_v)
        best_i = tl.where(better, cols, best_i)
    v = tl.max(best_v, 0)
    # First index reaching the max (ties -> lowest id, like torch.argmax).
    i = tl.min(tl.where(best_v == v, best_i, vocab), 0)
    tl.store(val_ptr + row * num_slices + part, v)
    tl.store(idx_ptr + row * num_slices + part, i)


def gumbel_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor | None,
    greedy_mask: torch.Tensor,
    seed: int,
) -> torch.Tensor:
    """One token per row of ``logits`` [B, V]: argmax for ``greedy_mask`` rows, else a draw
    from ``softmax(logits / temperature)``. ``seed`` (< 2**31) picks the noise (per step)."""
    b, v = logits.shape
    assert logits.stride(1) == 1
    num_slices = triton.cdiv(v, _SLICE)
    vals = torch.empty((b, num_slices), dtype=torch.float32, device=logits.device)
    idxs = torch.empty((b, num_slices), dtype=torch.int32, device=logits.device)
    _gumbel_argmax_kernel[(b, num_slices)](
        logits, temperature if temperature is not None else logits, greedy_mask, vals, idxs,
        seed, v, logits.stride(0), num_slices,
        HAS_TEMP=temperature is not None, SLICE=_SLICE, BLOCK=1024, U_MAX=_U_MAX, num_warps=4,
    )  # fmt: skip
    best = vals.argmax(dim=1, keepdim=True)
    return idxs.gather(1, best).squeeze(1).to(torch.int64)
