"""Run a model forward pass on every rank of a gloo tensor-parallel group, for CPU tests.

``spawn_ranks(fn, world_size, tmp_path, *args)`` starts ``world_size`` processes
(``torch.multiprocessing`` spawn, a ``file://`` rendezvous in ``tmp_path``, so no port can
clash), joins each to the TP group and calls ``fn(rank, world_size, *args)``.
``model_logits(model_dir)`` loads a tiny checkpoint for the current TP group, binds a paged
KV cache through the worker's own helpers (the spec checked against the model) and drives
two steps: two prompts prefilled, then a decode token for one and the prompt's last chunk for
the other (so the second step reads KV written by the first). It returns the logits of
every row, which every rank holds in full after the LM head's gather.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from pagedllm.config import EngineConfig
from pagedllm.distributed import (
    destroy_tensor_parallel,
    get_tp_rank,
    get_tp_size,
    init_tensor_parallel,
)
from pagedllm.layers.attention.layer import Attention
from pagedllm.layers.attention.metadata import AttentionMetadata
from pagedllm.layers.attention.torch_native import TorchNativeBackend
from pagedllm.models.loader import load_model
from pagedllm.worker.kv_cache_spec import bind_kv_caches, build_kv_cache_spec

# Two sequences: (tokens computed before the step, tokens computed in it) per step.
STEPS: list[list[tuple[int, int]]] = [[(0, 9), (0, 5)], [(9, 1), (5, 4)]]
BLOCKS_PER_SEQ = 2
NUM_BLOCKS = 2 * BLOCKS_PER_SEQ + 1


def _rank_main(
    rank: int, world_size: int, init_file: str, fn: Callable[..., Any], *args: Any
) -> None:
    torch.set_num_threads(1)
    init_tensor_parallel(rank, world_size, f"file://{init_file}")
    try:
        fn(rank, world_size, *args)
    finally:
        destroy_tensor_parallel()


def spawn_ranks(fn: Callable[..., Any], world_size: int, tmp_path: Path, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; re-raise a failure."""
    init_file = tmp_path / f"rendezvous-{world_size}"
    mp.spawn(_rank_main, args=(world_size, str(init_file), fn, *args), nprocs=world_size)


def _metadata(
    spans: list[tuple[int, int]], block_size: int
) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata and positions of one step; sequence i owns blocks ``i * BLOCKS_PER_SEQ ..``."""
    tables = [[i * BLOCKS_PER_SEQ + b for b in range(BLOCKS_PER_SEQ)] for i in range(len(spans))]
    slots: list[int] = []
    positions: list[int] = []
    query_start = [0]
    for (done, new), table in zip(spans, tables, strict=True):
        assert done + new <= BLOCKS_PER_SEQ * block_size
        positions += range(done, done + new)
        slots += [
            table[p // block_size] * block_size + p % block_size for p in range(done, done + new)
        ]
        query_start.append(query_start[-1] + new)
    seq_lens = [done + new for done, new in spans]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor(query_start, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        max_query_len=max(new for _, new in spans),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=query_start,
        seq_lens_cpu=seq_lens,
    )
    return meta, torch.tensor(positions)


def prompts(vocab_size: int) -> list[torch.Tensor]:
    """The two sequences' token ids (fixed)."""
    gen = torch.Generator().manual_seed(1234)
    return [
        torch.randint(6, vocab_size, (sum(n for _, n in (s[i] for s in STEPS)),), generator=gen)
        for i in range(len(STEPS[0]))
    ]


@torch.no_grad()
def model_logits(model_dir: Path) -> torch.Tensor:
    """Every row's logits [tokens, vocab] over ``STEPS`` for this process's TP rank."""
    config = EngineConfig(model=str(model_dir), device="cpu", dtype="float32")
    model = load_model(config)
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    spec = build_kv_cache_spec(config, attn, get_tp_rank(), get_tp_size())
    backend = TorchNativeBackend(
        attn[0].num_heads, attn[0].num_kv_heads, attn[0].head_dim, attn[0].scale
    )
    for layer in attn:
        layer.backend = backend
    bind_kv_caches(attn, backend, spec, NUM_BLOCKS, torch.device("cpu"))
    ids = prompts(config.model_config.arch.vocab_size)
    out = []
    for spans in STEPS:
        meta, positions = _metadata(spans, spec.block_size)
        step_ids = torch.cat([ids[i][done : done + new] for i, (done, new) in enumerate(spans)])
        hidden = model(step_ids, positions, backend.build_metadata(meta))
        out.append(model.compute_logits(hidden))
    return torch.cat(out)


def save_model_logits(rank: int, world_size: int, cases: dict[str, str], out_dir: str) -> None:
    """Spawned on every rank: each case's logits to ``<out_dir>/<case>.rank<r>.pt``."""
    for name, model_dir in cases.items():
        torch.save(model_logits(Path(model_dir)), Path(out_dir) / f"{name}.rank{rank}.pt")
