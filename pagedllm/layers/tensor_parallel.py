"""Tensor-parallel rank and world size as the sharded layers see them (fixed at 0 / 1 for now).

Every parallel layer (``linear.py``, ``embedding.py``) reads ``tp_rank`` / ``tp_size`` from
here once, at construction, and stores them on itself; its weight loaders then cut their
shard with ``narrow(dim, tp_rank * shard, shard)``. Adding tensor parallelism is a matter of
making these two functions return the process group's values (and adding the collectives
that the layers mark with ``NotImplementedError``), not of touching the loaders or models.
"""

from __future__ import annotations


def get_tp_rank() -> int:
    """This process's rank in the tensor-parallel group (always 0 until TP lands)."""
    return 0


def get_tp_size() -> int:
    """The tensor-parallel world size (always 1 until TP lands)."""
    return 1


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator // denominator``, raising a readable error unless it divides exactly."""
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})."
        )
    return numerator // denominator
