"""The CUDA-graph runner's static inputs, checked on CPU (no capture): each bucket's metadata
is built by the backend from views of that bucket's static buffers, so replays see the same
storage every time, and a replay's host staging pads the batch to the bucket correctly."""

from __future__ import annotations

import numpy as np
import torch

from pagedllm.layers.attention.metadata import AttentionMetadata
from pagedllm.worker.cuda_graph import DecodeGraphs, batch_buckets


def _graphs(seen: list[AttentionMetadata], forward=lambda ids, pos, meta: ids) -> DecodeGraphs:
    def build(common: AttentionMetadata) -> AttentionMetadata:
        seen.append(common)
        return common

    return DecodeGraphs(
        forward,
        build,
        max_batch=20,
        max_blocks_per_seq=6,
        max_seq_len=96,
        pad_block=9,
        block_size=16,
        device=torch.device("cpu"),
    )


def test_bucket_metadata_views_static_buffers() -> None:
    seen: list[AttentionMetadata] = []
    graphs = _graphs(seen)
    assert graphs.buckets == batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    for bs in graphs.buckets:
        meta = graphs._meta(bs)
        buf = graphs.inputs[bs]
        assert meta is seen[-1] and meta.num_seqs == bs
        assert (meta.max_query_len, meta.max_seq_len) == (1, 96)
        assert meta.query_start_loc_cpu == [] and meta.seq_lens_cpu == []  # nothing host-side
        pairs = [
            (meta.slot_mapping, buf.view(2)),
            (meta.query_start_loc, graphs.query_start),
            (meta.seq_lens, buf.seq_lens),
            (meta.block_tables, graphs.block_tables),
        ]
        for view, static in pairs:
            assert view.data_ptr() == static.data_ptr()  # same storage as what run() fills
        assert meta.query_start_loc.shape == (bs + 1,) and meta.block_tables.shape == (bs, 6)
        assert meta.slot_mapping.shape == (bs,) and meta.seq_lens.shape == (bs,)
        assert buf.view(2).eq(9 * 16).all()  # before any replay: the scratch block
        assert buf.seq_lens.eq(1).all()


def test_stage_pads_batch_to_bucket() -> None:
    graphs = _graphs([])
    ids = np.array([5, 6, 7], dtype=np.int64)
    pos = np.array([10, 20, 33], dtype=np.int64)
    slots = np.array([42, 81, 17], dtype=np.int64)
    lens = np.array([11, 21, 34], dtype=np.int32)
    tables = np.array([[2, 0, 0], [5, 3, 0], [1, 4, 7]], dtype=np.int32)
    packed, staged = graphs.stage(4, ids, pos, slots, lens, tables)
    assert packed.dtype == np.int64 and packed.shape == (16,)
    np.testing.assert_array_equal(packed[0:4], [5, 6, 7, 0])
    np.testing.assert_array_equal(packed[4:8], [10, 20, 33, 0])
    np.testing.assert_array_equal(packed[8:12], [42, 81, 17, 9 * 16])
    np.testing.assert_array_equal(packed[12:16], [11, 21, 34, 1])
    assert staged.dtype == np.int32 and staged.shape == (4, 3)
    np.testing.assert_array_equal(staged[:3], tables)
    assert (staged[3] == 9).all()


def test_graph_body_reads_the_packed_buffer() -> None:
    """What a replay runs: seq_lens cast from the packed buffer, then the forward on its views."""
    calls = []

    def forward(ids: torch.Tensor, pos: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        calls.append((ids.tolist(), pos.tolist(), meta.seq_lens.tolist()))
        return ids

    graphs = _graphs([], forward)
    packed, _ = graphs.stage(
        2,
        np.array([3], np.int64),
        np.array([8], np.int64),
        np.array([40], np.int64),
        np.array([9], np.int32),
        np.array([[2]], np.int32),
    )
    graphs.inputs[2].packed.copy_(torch.from_numpy(packed))
    graphs._body(2, graphs._meta(2))
    assert calls == [([3, 0], [8, 0], [9, 1])]
