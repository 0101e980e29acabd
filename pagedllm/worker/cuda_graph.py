"""CUDA graphs for decode steps: one captured forward per padded batch-size bucket.

A decode step (every sequence adds one token) has shapes that depend only on the batch size,
so its whole forward pass is captured once per bucket and replayed with the inputs copied into
static buffers. Padding rows write their K/V into a scratch slot outside the block pool and
attend over a one-token context, so they never touch real sequences.

Each bucket has its own small static input buffer, packed so that a replay needs one
host-to-device copy for the token inputs (plus one for the block tables' used columns).
Each bucket's attention metadata is built once, at capture, by the backend's
``build_metadata`` from views of the static buffers (no host lists: ``query_start_loc_cpu`` and
``seq_lens_cpu`` are empty and ``max_seq_len`` is the model's limit). A replay reuses it as
captured, so whatever the backend derives there may depend only on the bucket size and those
buffers' storage, never on their contents; it is kept alive with its graph because the graph
holds the addresses of any tensors it owns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.layers.attention.backend import AttentionMetadata

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


@dataclass
class _BucketInputs:
    """One bucket's static inputs. ``packed`` (int64) is filled by a single host-to-device copy
    per replay: ``[input ids | positions | slots | seq lens]``, ``bs`` entries each; the first
    three are used in place and the graph itself casts the last into the int32 ``seq_lens``."""

    packed: torch.Tensor
    seq_lens: torch.Tensor

    def view(self, i: int) -> torch.Tensor:
        bs = self.seq_lens.shape[0]
        return self.packed[i * bs : (i + 1) * bs]


class DecodeGraphs:
    """Captures ``forward(input_ids, positions, meta) -> hidden`` for decode batch buckets."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor],
        build_metadata: Callable[[AttentionMetadata], AttentionMetadata],
        max_batch: int,
        max_blocks_per_seq: int,
        max_seq_len: int,
        pad_block: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.forward = forward
        self.build_metadata = build_metadata
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self.max_seq_len = max_seq_len
        self.pad_block = pad_block
        self.pad_slot = pad_block * block_size
        n = self.max_batch
        self.inputs = {
            bs: _BucketInputs(
                packed=torch.zeros(4 * bs, dtype=torch.int64, device=device),
                seq_lens=torch.ones(bs, dtype=torch.int32, device=device),
            )
            for bs in self.buckets
        }
        for buf in self.inputs.values():
            buf.view(2).fill_(self.pad_slot)
            buf.view(3).fill_(1)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.full(
            (n, max_blocks_per_seq), pad_block, dtype=torch.int32, device=device
        )
        # bucket -> (graph, its output, the metadata it was captured with)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, AttentionMetadata]] = {}

    def _meta(self, bs: int) -> AttentionMetadata:
        buf = self.inputs[bs]
        common = AttentionMetadata(
            slot_mapping=buf.view(2),
            query_start_loc=self.query_start[: bs + 1],
            seq_lens=buf.seq_lens,
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            query_start_loc_cpu=[],
            seq_lens_cpu=[],
        )
        return self.build_metadata(common)

    def _body(self, bs: int, meta: AttentionMetadata) -> torch.Tensor:
        buf = self.inputs[bs]
        buf.seq_lens.copy_(buf.view(3))
        return self.forward(buf.view(0), buf.view(1), meta)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = None
        for bs in reversed(self.buckets):
            meta = self._meta(bs)
            self._body(bs, meta)  # warm up (Triton compilation, cuBLAS handles)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._body(bs, meta)
            pool = graph.pool()
            self.graphs[bs] = (graph, hidden, meta)
        torch.cuda.synchronize()
        logger.info(
            "Captured %d decode CUDA graphs (batch 1..%d) in %.1f s",
            len(self.graphs), self.max_batch, time.perf_counter() - start,
        )  # fmt: skip

    def run(
        self,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slot_mapping: np.ndarray,
        seq_lens: np.ndarray,
        block_tables: np.ndarray,
        fixups: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Replay the smallest bucket that fits; inputs are host arrays of the real batch.

        Two copies per replay: the packed ids, positions, slots and lengths (padding rows get a
        one-token context in the scratch slot), and the block tables' used columns.
        ``fixups`` = (rows, device tokens) overwrite input ids still on the device.
        """
        b = input_ids.shape[0]
        bs = next(x for x in self.buckets if x >= b)
        graph, hidden, _ = self.graphs[bs]
        buf = self.inputs[bs]
        packed, tables = self.stage(bs, input_ids, positions, slot_mapping, seq_lens, block_tables)
        buf.packed.copy_(torch.from_numpy(packed).pin_memory(), non_blocking=True)
        host_tables = torch.from_numpy(tables).pin_memory()
        self.block_tables[:bs, : tables.shape[1]].copy_(host_tables, non_blocking=True)
        if fixups is not None:
            buf.view(0)[fixups[0]] = fixups[1]
        graph.replay()
        return hidden[:b]

    def stage(
        self,
        bs: int,
        input_ids: np.ndarray,
        positions: np.ndarray,
        slot_mapping: np.ndarray,
        seq_lens: np.ndarray,
        block_tables: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The host side of a replay of bucket ``bs``: the packed int64 inputs and the block
        tables' used columns, both padded to ``bs`` rows (padding rows: token 0 at position 0,
        one-token context whose only block is the scratch block)."""
        b = input_ids.shape[0]
        packed = np.empty(4 * bs, dtype=np.int64)
        inputs = ((input_ids, 0), (positions, 0), (slot_mapping, self.pad_slot), (seq_lens, 1))
        for i, (values, pad) in enumerate(inputs):
            packed[i * bs : i * bs + b] = values
            packed[i * bs + b : (i + 1) * bs] = pad
        tables = np.empty((bs, block_tables.shape[1]), dtype=np.int32)
        tables[:b] = block_tables
        tables[b:] = self.pad_block
        return packed, tables
