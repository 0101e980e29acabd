"""CUDA graphs for decode steps: one captured forward per padded batch-size bucket.

A decode step (every sequence adds one token) has shapes that depend only on the batch size,
so its whole forward pass is captured once per bucket and replayed with the inputs copied into
static buffers. Padding rows write their K/V into a scratch slot outside the block pool and
attend over a one-token context, so they never touch real sequences.

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

import torch

from pagedllm.layers.attention.backend import AttentionMetadata

logger = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


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
        pad_slot = pad_block * block_size
        self.pad_slot = pad_slot
        n = self.max_batch
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), pad_slot, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.full(
            (n, max_blocks_per_seq), pad_block, dtype=torch.int32, device=device
        )
        # bucket -> (graph, its output, the metadata it was captured with)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, AttentionMetadata]] = {}

    def _meta(self, bs: int) -> AttentionMetadata:
        common = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            query_start_loc_cpu=[],
            seq_lens_cpu=[],
        )
        return self.build_metadata(common)

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        pool = None
        for bs in reversed(self.buckets):
            meta = self._meta(bs)
            args = (self.input_ids[:bs], self.positions[:bs], meta)
            self.forward(*args)  # warm up (Triton compilation, cuBLAS handles)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.forward(*args)
            pool = graph.pool()
            self.graphs[bs] = (graph, hidden, meta)
        torch.cuda.synchronize()
        logger.info(
            "Captured %d decode CUDA graphs (batch 1..%d) in %.1f s",
            len(self.graphs), self.max_batch, time.perf_counter() - start,
        )  # fmt: skip

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        fixups: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Replay the smallest bucket that fits; inputs are CPU tensors of the real batch.

        ``fixups`` = (rows, device tokens) overwrite input ids still on the device.
        """
        b = input_ids.shape[0]
        bs = next(x for x in self.buckets if x >= b)
        graph, hidden, _ = self.graphs[bs]
        self.input_ids[:b].copy_(input_ids.pin_memory(), non_blocking=True)
        if fixups is not None:
            self.input_ids[fixups[0]] = fixups[1]
        self.positions[:b].copy_(positions.pin_memory(), non_blocking=True)
        self.slot_mapping[:b].copy_(slot_mapping.pin_memory(), non_blocking=True)
        self.seq_lens[:b].copy_(seq_lens.pin_memory(), non_blocking=True)
        width = block_tables.shape[1]
        self.block_tables[:b, :width].copy_(block_tables.pin_memory(), non_blocking=True)
        if bs > b:  # padding rows: one-token context in the scratch slot
            self.slot_mapping[b:bs].fill_(self.pad_slot)
            self.seq_lens[b:bs].fill_(1)
            self.block_tables[b:bs, 0].fill_(self.pad_block)
        graph.replay()
        return hidden[:b]
