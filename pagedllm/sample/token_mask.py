"""Packed allowed-token masks: the hook through which grammars constrain sampling.

A constraint says, per row, which token ids may be sampled next. It travels as a packed
``int32`` bitmask of shape ``[B, ceil(V / 32)]``: token ``t`` is allowed iff bit ``t % 32``
(least significant first) of word ``t // 32`` is set, so an unconstrained row is all ``-1``.
This is the layout grammar engines such as xgrammar fill on the host, and it is 8 times
smaller than a ``[B, V]`` bool tensor, which matters because the mask is rebuilt on the host
and copied to the device every step (256 rows x 152k tokens: 4.9 MB instead of 39 MB).

``prepare_allowed_mask`` is what ``SamplingMetadata.build`` calls: it accepts either the packed
form or a ``[B, V]`` bool tensor (convenient in tests), ignores the bits past ``V`` in the last
word, refuses a row that allows no token at all (sampling from it would be undefined) and
returns ``None`` when no row is actually constrained, so the mask stage stays inactive and
the batch keeps the one-pass sampler.
"""

from __future__ import annotations

import numpy as np
import torch

from pagedllm.device_utils import h2d

BITS = 32


def bitmask_width(vocab_size: int) -> int:
    """Number of int32 words per row for a ``vocab_size``-token vocabulary."""
    return (vocab_size + BITS - 1) // BITS


def pack_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """``[B, V]`` bool (True = allowed) -> packed ``[B, ceil(V / 32)]`` int32 bitmask."""
    b, v = mask.shape
    w = bitmask_width(v)
    padded = torch.zeros(b, w * BITS, dtype=torch.int64, device=mask.device)
    padded[:, :v] = mask.to(torch.int64)
    shifts = torch.arange(BITS, dtype=torch.int64, device=mask.device)
    words = (padded.view(b, w, BITS) << shifts).sum(dim=-1)  # bits are disjoint: sum == or
    # Reinterpret the unsigned 32-bit value as int32 (two's complement).
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_token_mask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed ``[B, W]`` int32 bitmask -> ``[B, vocab_size]`` bool (True = allowed)."""
    b, w = bitmask.shape
    shifts = torch.arange(BITS, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # arithmetic shift: the sign bit reads as 1
    return bits.view(b, w * BITS)[:, :vocab_size].bool()


def prepare_allowed_mask(
    mask: torch.Tensor, batch_size: int, vocab_size: int, device: torch.device
) -> torch.Tensor | None:
    """Validate and pack a caller's allowed-token mask for one batch (see the module doc).

    Args:
        mask: ``[B, V]`` bool, or packed ``[B, ceil(V / 32)]`` int32, on any device (a device
            mask costs one synchronisation for the checks; grammar masks are built on the host).
        batch_size: ``B``, the number of sampling rows.
        vocab_size: ``V``.
        device: where the sampler runs.

    Returns:
        The packed int32 bitmask on ``device``, or ``None`` if every row allows every token.

    Raises:
        ValueError: wrong shape or dtype, or a row that allows no token (the error names the
            rows).
    """
    w = bitmask_width(vocab_size)
    if mask.dtype == torch.bool:
        if tuple(mask.shape) != (batch_size, vocab_size):
            raise ValueError(
                f"allowed_token_mask: bool mask must be [{batch_size}, {vocab_size}], "
                f"got {list(mask.shape)}"
            )
        packed = pack_token_mask(mask)
    elif mask.dtype == torch.int32:
        if tuple(mask.shape) != (batch_size, w):
            raise ValueError(
                f"allowed_token_mask: packed mask must be [{batch_size}, {w}] int32, "
                f"got {list(mask.shape)}"
            )
        packed = mask
    else:
        raise ValueError(f"allowed_token_mask must be bool or int32, got {mask.dtype}")
    # Checked on the packed words (B x V / 32, not B x V) in numpy: torch's CPU ops on a
    # mask this size cost milliseconds each in a busy engine process (thread-pool wake-ups),
    # numpy's tens of microseconds. The last word's bits past V are ignored.
    words = packed.cpu().numpy()
    tail_bits = vocab_size - (w - 1) * BITS
    tail = np.int32(-1 if tail_bits == BITS else (1 << tail_bits) - 1)
    last = words[:, -1] & tail
    any_allowed = words[:, :-1].any(axis=1) | (last != 0)
    empty = np.flatnonzero(~any_allowed).tolist()
    if empty:
        raise ValueError(
            f"allowed_token_mask allows no token for sampling row(s) {empty}; every row must "
            "allow at least one token id in [0, vocab_size)"
        )
    if (words[:, :-1] == -1).all() and (last == tail).all():
        return None
    # Always a copy: the caller may refill its buffer while this step runs.
    if device.type != "cuda":
        return torch.from_numpy(words.copy())
    if packed.device.type == "cuda":
        return packed.clone() if packed is mask else packed
    return h2d(words, torch.int32, device)  # pinned staging, then an async copy
