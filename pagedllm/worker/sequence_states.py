"""The worker's own copy of every live sequence, kept up to date from the step contract.

A sequence's state (sampling parameters, generator, token ids, its row of the persistent block
table in ``block_table.py``) is created when the scheduler first sends it (``NewSequenceData``),
updated from each step's diffs (``ScheduledSequence``: new tokens the host learnt, new or
replaced blocks) and dropped when the scheduler reports it finished. It survives preemption:
the generator keeps its position, so a seeded sequence samples the same tokens whether or not
it was preempted. Nothing here reads scheduler objects, so a worker in another process can keep
the same state from the same steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagedllm.core.scheduler_output import NewSequenceData, ScheduledSequence, SchedulerOutput
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

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seqs: dict[str, WorkerSequence] = {}
        self.block_table = BlockTable()

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

    def _update(self, sched: ScheduledSequence) -> None:
        seq = self.seqs[sched.seq_id]
        seq.output_token_ids.extend(sched.new_token_ids)
        if sched.reset_blocks:
            self.block_table.set(seq.row, sched.block_ids)
        else:
            self.block_table.append(seq.row, sched.block_ids)
