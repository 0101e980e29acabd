"""Integer packing of GPTQ and AWQ checkpoints, written from the formats, in plain torch.

Both formats store ``32 // bits`` unsigned integers per int32 word, the first in the lowest
bits. They differ in which dimension is packed and in what order the values sit in a word:

* GPTQ packs ``qweight`` along the input dimension (``[K / pf, N]``: word ``(r, n)`` holds
  rows ``r * pf .. r * pf + pf - 1`` of column ``n``) and ``qzeros`` along the output
  dimension (``[G, N / pf]``), both in natural order. Its v1 convention (what AutoGPTQ,
  GPTQModel's ``format="gptq"`` and the hub's ``-GPTQ-Int4`` models store) writes the zero
  points as ``pack(z) - 0x11111111`` (4 bits) on the packed words; the exact inverse is adding
  the same constant to the words, which we do (readers that add 1 per unpacked value instead
  disagree where a zero point is 0, since the subtraction borrowed from the next value).
* AWQ's GEMM layout packs ``qweight`` (``[K, N / 8]``) and ``qzeros`` (``[G, N / 8]``) along
  the output dimension, value ``i`` of a word being column ``AWQ_ORDER[i]`` of its eight, and
  stores the zero points as they are.

The dequantized weight is ``W[k, n] = scales[g(k), n] * (q[k, n] - zeros[g(k), n])``, with
``g(k) = g_idx[k]`` for GPTQ (act-order checkpoints permute the groups) and ``k // group``
for AWQ. The methods read both formats with these functions into one layout after loading
(``weight_only.py``), which the CPU path and the GPU kernel share.
"""

from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_factor(bits: int) -> int:
    """How many ``bits``-bit values one int32 word holds."""
    if 32 % bits:
        raise ValueError(f"{bits}-bit values do not fill int32 words evenly")
    return 32 // bits


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """``[R, C]`` int32 words -> ``[R * pf, C]`` values; word ``(r, c)`` holds rows
    ``r * pf ..`` of column ``c``, lowest bits first (GPTQ's ``qweight``)."""
    pf = pack_factor(bits)
    vals = (packed.unsqueeze(1) >> _shifts(bits, packed.device).view(1, pf, 1)) & ((1 << bits) - 1)
    return vals.reshape(packed.shape[0] * pf, packed.shape[1])


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_rows`: ``[K, N]`` values (< 2**bits) -> ``[K / pf, N]`` words.

    Built in int32 one value position at a time (the top value's shift may set the sign bit,
    which is the intended bit pattern), so the temporaries stay the size of the result.
    """
    pf = pack_factor(bits)
    v = values.reshape(values.shape[0] // pf, pf, values.shape[1])
    words = torch.zeros(v.shape[0], v.shape[2], dtype=torch.int32, device=values.device)
    for i in range(pf):
        words |= v[:, i].to(torch.int32) << (bits * i)
    return words


def unpack_cols(
    packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None
) -> torch.Tensor:
    """``[R, C]`` int32 words -> ``[R, C * pf]`` values; value ``i`` of word ``(r, c)`` is
    column ``c * pf + order[i]`` (natural order by default)."""
    pf = pack_factor(bits)
    vals = (packed.unsqueeze(-1) >> _shifts(bits, packed.device)) & ((1 << bits) - 1)
    if order is not None:
        if sorted(order) != list(range(pf)):
            raise ValueError(f"{order} is not an order of {pf} values")
        out = torch.empty_like(vals)
        out[..., list(order)] = vals
        vals = out
    return vals.reshape(packed.shape[0], packed.shape[1] * pf)


def gptq_v1_zero_offset(bits: int) -> int:
    """The constant a GPTQ v1 writer subtracted from each packed ``qzeros`` word (as int32)."""
    word = sum(1 << (bits * i) for i in range(pack_factor(bits)))
    return word - (1 << 32) if word >= 1 << 31 else word


def gptq_zeros(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """``[G, N / pf]`` v1 words -> ``[G, N]`` zero points (the writer's subtraction undone on
    the words, wrapping like the int32 arithmetic that made them)."""
    offset = gptq_v1_zero_offset(bits)
    words = (qzeros.to(torch.int64) + offset) & 0xFFFFFFFF
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return unpack_cols(words, bits)
