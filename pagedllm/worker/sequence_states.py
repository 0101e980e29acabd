"""The worker's own copy of every live sequence, kept up to date from the step contract.

A sequence's state (sampling parameters, generator, token ids, its row of the persistent block
table in ``block_table.py``) is created when the scheduler first sends it (``NewSequenceData``),
updated from each step's diffs (``ScheduledSequence``: new tokens the host learnt, new or
replaced blocks) and dropped when the scheduler reports it finished. It survives preemption:
the generator keeps its position, so a seeded sequence samples the same tokens whether or not
it was preempted. A sequence with images (a multimodal model) also keeps its images' features,
its M-RoPE position ids and delta (``multimodal/mrope.py``), and a reference to its images'
entries in the encoder cache (``multimodal/encoder_cache.py``) until it finishes, so neither
chunked prefill nor preemption encodes an image twice. Nothing here reads scheduler objects,
so a worker in another process can keep the same state from the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagedllm.core.scheduler_output import (
    MultiModalFeature,
    NewSequenceData,
    ScheduledSequence,
    SchedulerOutput,
)
from pagedllm.multimodal.encoder_cache import EncoderCache
from pagedllm.multimodal.mrope import mrope_positions
from pagedllm.sampling_params import SamplingParams
from pagedllm.worker.block_table import BlockTable


@dataclass(eq=False)
class WorkerSequence:
    """What the worker knows of one sequence: its prompt and every output token the host has
    confirmed (tokens sampled by the step still in flight are not here yet). The two lists are
    kept apart so that the sampler can read them every step without copying."""

    seq_id: str
    index: int
    params: SamplingParams
    prompt_token_ids: list[int]
    generator: torch.Generator | None
    table: BlockTable = field(repr=False)
    row: int  # the sequence's row in ``table``
    output_token_ids: list[int] = field(default_factory=list)
    mm_features: list[MultiModalFeature] = field(default_factory=list)
    mrope: np.ndarray | None = None  # [3, num_prompt] M-RoPE ids (sequences with images)
    mrope_delta: int = 0  # M-RoPE id minus position for tokens past the prompt

    @property
    def block_ids(self) -> list[int]:
        return self.table.ids(self.row)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        """Prompt and outputs as one (new) list."""
        return self.prompt_token_ids + self.output_token_ids

    def tokens(self, start: int, end: int) -> list[int]:
        """Known token ids at positions ``[start, end)`` (fewer if they are not known yet)."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]


class SequenceStates:
    """Every sequence the worker holds, by id (see the module doc)."""

    def __init__(self, device: torch.device, mrope_merge_size: int | None = None) -> None:
        """``mrope_merge_size``: the vision tower's ``spatial_merge_size`` for an M-RoPE model
        (its sequences with images get M-RoPE ids), None for a text-only model."""
        self.device = device
        self.seqs: dict[str, WorkerSequence] = {}
        self.block_table = BlockTable()
        self.mrope_merge_size = mrope_merge_size
        self.encoder_cache = EncoderCache()
        self.num_mm = 0  # live sequences with images: 0 keeps text-only steps on their path

    def __len__(self) -> int:
        return len(self.seqs)

    def __getitem__(self, seq_id: str) -> WorkerSequence:
        return self.seqs[seq_id]

    def apply(self, step: SchedulerOutput) -> None:
        """Bring every state up to the start of ``step``."""
        for seq_id in step.finished_seq_ids:
            seq = self.seqs.pop(seq_id, None)
            if seq is not None:
                self.block_table.free_row(seq.row)
                if seq.mm_features:
                    self.num_mm -= 1
                    self.encoder_cache.release(seq_id, [f.content_hash for f in seq.mm_features])
        for new in step.new_sequences:
            self._add(new)
        for sched in step.scheduled:
            self._update(sched)

    def _add(self, new: NewSequenceData) -> None:
        gen = None
        if new.seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(new.seed)
        self.seqs[new.seq_id] = WorkerSequence(
            seq_id=new.seq_id,
            index=new.index,
            params=new.params,
            prompt_token_ids=list(new.prompt_token_ids),
            generator=gen,
            table=self.block_table,
            row=self.block_table.add_row(),
        )
        if new.mm_features:
            self._add_images(self.seqs[new.seq_id], new.mm_features)

    def _add_images(self, seq: WorkerSequence, features: list[MultiModalFeature]) -> None:
        if self.mrope_merge_size is None:
            raise ValueError(f"{seq.seq_id}: this model takes no images.")
        seq.mm_features = list(features)
        seq.mrope, seq.mrope_delta = mrope_positions(
            seq.num_prompt_tokens, seq.mm_features, self.mrope_merge_size
        )
        self.num_mm += 1
        self.encoder_cache.hold(seq.seq_id, [f.content_hash for f in features])

    def _update(self, sched: ScheduledSequence) -> None:
        seq = self.seqs[sched.seq_id]
        seq.output_token_ids.extend(sched.new_token_ids)
        if sched.reset_blocks:
            self.block_table.set(seq.row, sched.block_ids)
        else:
            self.block_table.append(seq.row, sched.block_ids)
