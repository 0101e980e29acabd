"""Shape arithmetic for tensor-parallel layers.

The rank and world size live in ``pagedllm.distributed`` (the process group); every parallel
layer (``linear.py``, ``embedding.py``) reads them once, at construction, and its weight
loaders cut their shard with ``narrow(dim, tp_rank * shard, shard)``.
"""

from __future__ import annotations


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator // denominator``, raising a readable error unless it divides exactly."""
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})."
        )
    return numerator // denominator
