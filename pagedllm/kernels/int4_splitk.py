"""How the weight-only GEMM kernels add up the slices of a split K (``kernels/int4_gemm.py``).

At decode the weight read is the whole cost and ``N / BLOCK_N`` output tiles alone leave most
SMs idle, so the kernels split K over ``SPLIT_K`` programs per tile. Their fp32 partial sums
are added in one of four ways (``REDUCE``), each with its own cost in launches and bytes:

* ``none`` (0): no split; the program writes the output (and bias).
* ``atomic`` (1): each program atomically adds into a zeroed output in the activation dtype
  (one memset, no extra kernel, but the order of the additions varies run to run);
* ``twopass`` (2): partials to an fp32 workspace, then :func:`reduce_partials` (one more
  launch; deterministic);
* ``serial`` (3): partials to the workspace, then the program that finishes a tile last
  (a per-tile counter, reset by that program for the next call) adds the slices in order
  and writes the output: one launch and deterministic.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

REDUCE_MODES = {"none": 0, "atomic": 1, "twopass": 2, "serial": 3}


@triton.jit
def split_k_epilogue(
    acc, rows, cols, m, n, pid_k, tile_id, split_k,
    b_ptr, out_ptr, part_ptr, lock_ptr, stride_om,
    HAS_BIAS: tl.constexpr, REDUCE: tl.constexpr,
):  # fmt: skip
    """Write this program's ``[BLOCK_M, BLOCK_N]`` fp32 ``acc`` the ``REDUCE`` way (module doc)."""
    col_ok = cols < n
    mask = (rows < m)[:, None] & col_ok[None, :]
    out_offs = rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    part_offs = rows.to(tl.int64)[:, None] * n + cols[None, :]
    if REDUCE == 0:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    elif REDUCE == 1:
        if HAS_BIAS:  # noqa: SIM102 - a constexpr test, then a runtime one
            if pid_k == 0:
                acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(
            out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask, sem="relaxed"
        )
    else:
        slice_size = m.to(tl.int64) * n
        tl.store(part_ptr + pid_k * slice_size + part_offs, acc, mask=mask)
        if REDUCE == 3:
            tl.debug_barrier()  # every thread's partials are written before the release
            done = tl.atomic_add(lock_ptr + tile_id, 1, sem="acq_rel", scope="gpu")
            if done == split_k - 1:
                # Eight slices per round trip to L2 (a loop of one would wait split_k
                # latencies in a row), added in slice order all the same.
                total = tl.zeros_like(acc)
                for s0 in range(0, split_k, 8):
                    for j in tl.static_range(8):
                        total += tl.load(
                            part_ptr + (s0 + j) * slice_size + part_offs,
                            mask=mask & (s0 + j < split_k),
                            other=0.0,
                            cache_modifier=".cg",
                        )
                if HAS_BIAS:
                    total += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(out_ptr + out_offs, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(lock_ptr + tile_id, 0)  # ready for the next call


@triton.jit
def _reduce_kernel(
    part_ptr, b_ptr, out_ptr, total, n, split_k, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    acc = tl.zeros([BLOCK], tl.float32)
    for s0 in range(0, split_k, 8):
        for j in tl.static_range(8):
            acc += tl.load(
                part_ptr + (s0 + j) * total + offs, mask=ok & (s0 + j < split_k), other=0.0
            )
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs % n, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def reduce_partials(
    part: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """``out[M, N] = part[S, M, N].sum(0) (+ bias)`` in ``out``'s dtype (the ``twopass`` step)."""
    s, m, n = part.shape
    total, block = m * n, 1024
    _reduce_kernel[(triton.cdiv(total, block),)](
        part, bias if bias is not None else part, out, total, n, s,
        HAS_BIAS=bias is not None, BLOCK=block,
    )  # fmt: skip
    return out


LOCKS = 1 << 16  # per-tile counters of the ``serial`` reduction; more tiles than any layer has


@functools.cache
def tile_locks(device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters (one per output tile), kept zero by the kernels between calls."""
    return torch.zeros(LOCKS, dtype=torch.int32, device=device)


def split_k_buffers(
    reduce: str, split_k: int, tiles: int, m: int, n: int, dtype: torch.dtype, device: torch.device
) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(reduce, out, partials, locks)`` for one launch of ``tiles`` output tiles (unused
    buffers are ``out`` itself). ``reduce`` is ``none`` without a split, and ``twopass``
    instead of ``serial`` past :data:`LOCKS` tiles."""
    if split_k == 1 or reduce == "none":
        out = torch.empty((m, n), dtype=dtype, device=device)
        return "none", out, out, out
    if reduce == "atomic":
        out = torch.zeros((m, n), dtype=dtype, device=device)
        return reduce, out, out, out
    if reduce == "serial" and tiles > LOCKS:
        reduce = "twopass"
    out = torch.empty((m, n), dtype=dtype, device=device)
    part = torch.empty((split_k, m, n), dtype=torch.float32, device=device)
    locks = tile_locks(out.device) if reduce == "serial" else out
    return reduce, out, part, locks
