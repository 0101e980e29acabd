"""Per-step attention metadata: the fields every backend shares, and how backends extend them.

The model runner describes one step's flattened batch once, in an ``AttentionMetadata``; the
chosen backend's ``build_metadata`` turns that into its own subclass with whatever it derives
per step (the torch backend's decode/prefill split, the Triton backend's launch plan). Typed
subclasses rather than a free-form dict keep each backend's per-step data discoverable and
checked, and let the CUDA-graph runner build them from its static buffers like any other step.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, TypeVar

import torch

M = TypeVar("M", bound="AttentionMetadata")


@dataclass
class AttentionMetadata:
    """What every backend needs about one step's flattened batch of T new tokens.

    Sequence i owns query rows ``query_start_loc[i]:query_start_loc[i+1]``; its context
    (cached tokens plus new ones) is ``seq_lens[i]`` tokens long, stored in the KV cache blocks
    ``block_tables[i]``. ``slot_mapping[t]`` is where token t's key/value goes
    (``block_id * block_size + offset``). The ``*_cpu`` lists mirror the device tensors on the
    host; CUDA-graph steps leave them empty (nothing on the host may differ between replays).
    """

    slot_mapping: torch.Tensor  # [T] int64
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        """B, read from the tensor's shape (no host list or device sync needed)."""
        return self.seq_lens.shape[0]

    def specialize(self, cls: type[M], **extra: Any) -> M:
        """A ``cls`` (a subclass) holding these shared fields plus ``extra``'s own fields."""
        shared = {f.name: getattr(self, f.name) for f in fields(AttentionMetadata)}
        return cls(**shared, **extra)
