"""Step preparation: the flat inputs of one step, built from the worker's sequence states.

A step's batch is the concatenation of each scheduled span's tokens. For every span this
gathers its token ids (a position the worker's copy does not reach yet is the previous step's
sample, still on the device: it is patched in from that step's sampled-id tensor), positions,
KV slots and block table, and decides which hidden rows need logits: the last row of a span
that samples (once per sampled sequence: n > 1 siblings share their leader's row) and the
prompt positions whose logprobs were asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.sample.metadata import SamplingRow
from pagedllm.worker.sequence_states import SequenceStates


@dataclass
class StepInputs:
    """Host-side inputs of one step (see the module doc)."""

    ids_parts: list[list[int]] = field(default_factory=list)
    pos_parts: list[np.ndarray] = field(default_factory=list)
    slot_parts: list[np.ndarray] = field(default_factory=list)
    query_start: list[int] = field(default_factory=lambda: [0])
    seq_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    # Input rows whose token is the previous step's sample, and its row in that step's output.
    fix_rows: list[int] = field(default_factory=list)
    fix_src: list[int] = field(default_factory=list)
    logit_rows: list[int] = field(default_factory=list)  # hidden rows whose logits are needed
    sample_rows: list[SamplingRow] = field(default_factory=list)
    sample_src: list[int] = field(default_factory=list)  # index into logit_rows per sample row
    sample_ids: list[str] = field(default_factory=list)  # sequence id per sample row
    # Prompt logprobs: (sequence id, first position, count, k), the logit_rows index of each
    # covered position, and the prompt token each position predicts.
    prompt_spans: list[tuple[str, int, int, int]] = field(default_factory=list)
    prompt_rows: list[int] = field(default_factory=list)
    prompt_targets: list[int] = field(default_factory=list)


def prepare_step_inputs(
    step: SchedulerOutput,
    states: SequenceStates,
    block_size: int,
    last_rows: dict[str, int],
) -> StepInputs:
    """Flat inputs of ``step``; ``last_rows`` maps sequence id -> row of the previous step's
    sampled ids (for tokens still on the device)."""
    inp = StepInputs()
    for sched in step.scheduled:
        seq = states[sched.seq_id]
        start, end = sched.num_computed_tokens, sched.end
        row0 = inp.query_start[-1]
        ids = seq.tokens(start, end)
        if len(ids) < end - start:  # the last token is still on the device
            missing = end - start - len(ids)
            assert missing == 1, f"{sched.seq_id}: {missing} tokens missing on the worker"
            ids = ids + [0]
            inp.fix_rows.append(row0 + end - start - 1)
            inp.fix_src.append(last_rows[sched.seq_id])
        inp.ids_parts.append(ids)
        pos = np.arange(start, end, dtype=np.int64)
        table = np.asarray(seq.block_ids, dtype=np.int64)
        inp.pos_parts.append(pos)
        inp.slot_parts.append(table[pos // block_size] * block_size + pos % block_size)
        inp.query_start.append(row0 + end - start)
        inp.seq_lens.append(end)
        inp.block_tables.append(seq.block_ids)
        k = seq.params.prompt_logprobs
        num_prompt = seq.num_prompt_tokens
        if k is not None and seq.index == 0 and start < num_prompt - 1:
            stop = min(end, num_prompt - 1)
            inp.prompt_spans.append((seq.seq_id, start, stop - start, k))
            first = len(inp.logit_rows)
            inp.prompt_rows.extend(range(first, first + stop - start))
            inp.logit_rows.extend(range(row0, row0 + stop - start))
            inp.prompt_targets.extend(seq.prompt_token_ids[start + 1 : stop + 1])
        if sched.samples:
            inp.logit_rows.append(inp.query_start[-1] - 1)
            for sid in sched.sample_seq_ids:
                target = states[sid]
                inp.sample_rows.append(
                    SamplingRow(
                        target.params,
                        target.prompt_token_ids,
                        target.output_token_ids,
                        target.generator,
                        num_output_tokens=end - num_prompt,
                        logit_bias=target.params.logit_bias,
                    )
                )
                inp.sample_src.append(len(inp.logit_rows) - 1)
                inp.sample_ids.append(sid)
    return inp
