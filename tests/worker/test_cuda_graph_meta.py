"""The CUDA-graph runner's per-bucket metadata, checked on CPU (no capture): it is built by the
backend from views of the static input buffers, so replays see the same storage every time."""

from __future__ import annotations

import torch

from pagedllm.layers.attention.metadata import AttentionMetadata
from pagedllm.worker.cuda_graph import DecodeGraphs, batch_buckets


def test_bucket_metadata_views_static_buffers() -> None:
    seen: list[AttentionMetadata] = []

    def build(common: AttentionMetadata) -> AttentionMetadata:
        seen.append(common)
        return common

    graphs = DecodeGraphs(
        lambda ids, pos, meta: ids,
        build,
        max_batch=20,
        max_blocks_per_seq=6,
        max_seq_len=96,
        pad_block=9,
        block_size=16,
        device=torch.device("cpu"),
    )
    assert graphs.buckets == batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    for bs in graphs.buckets:
        meta = graphs._meta(bs)
        assert meta is seen[-1] and meta.num_seqs == bs
        assert (meta.max_query_len, meta.max_seq_len) == (1, 96)
        assert meta.query_start_loc_cpu == [] and meta.seq_lens_cpu == []  # nothing host-side
        pairs = [
            (meta.slot_mapping, graphs.slot_mapping),
            (meta.query_start_loc, graphs.query_start),
            (meta.seq_lens, graphs.seq_lens),
            (meta.block_tables, graphs.block_tables),
        ]
        for view, buf in pairs:
            assert view.data_ptr() == buf.data_ptr()  # same storage as what run() fills
        assert meta.query_start_loc.shape == (bs + 1,) and meta.block_tables.shape == (bs, 6)
    assert graphs.slot_mapping.eq(9 * 16).all()  # padding rows write to the scratch block
