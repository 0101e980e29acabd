"""Step preparation: the flat inputs of one step, built from the worker's sequence states.

A step's batch is the concatenation of each scheduled span's tokens. For every span this
gathers its token ids (a position the worker's copy does not reach yet is the previous step's
sample, still on the device: it is patched in from that step's sampled-id tensor), positions,
KV slots and block table, and decides which hidden rows need logits: the last row of a span
that samples (once per sampled sequence: n > 1 siblings share their leader's row) and the
prompt positions whose logprobs were asked for.

While a sequence with images is live (a multimodal model), a step also gets its M-RoPE ids
(``rope_positions``: ``[3, T]``, or ``[T]`` when every row's three ids agree, as in decode
steps, which CUDA graphs can then replay) and, for each image a span overlaps, which of the
image's embedding rows go to which input rows (``mm_spans``). Text-only batches skip this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pagedllm.core.scheduler_output import MultiModalFeature, SchedulerOutput
from pagedllm.sample.metadata import SamplingRow
from pagedllm.worker.sequence_states import SequenceStates


@dataclass
class StepInputs:
    """Host-side inputs of one step (see the module doc); arrays have one entry per input row
    (token) or per scheduled span."""

    input_ids: np.ndarray  # [T] int64; rows in fix_rows hold 0 until patched on the device
    positions: np.ndarray  # [T] int64
    slot_mapping: np.ndarray  # [T] int64: block * block_size + offset of each token's KV
    query_start: np.ndarray  # [B + 1] int32: span b is rows [query_start[b], query_start[b+1])
    seq_lens: np.ndarray  # [B] int32: context length of each span after this step
    block_tables: np.ndarray  # [B, W] int32, W = blocks covering the longest context
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
    # Speculative spans: sequence id -> its draft tokens (its sample rows are consecutive:
    # one per draft position, then one past them).
    drafts: dict[str, list[int]] = field(default_factory=dict)
    # Multimodal: rotary ids when they differ from ``positions`` (M-RoPE), and per image that
    # a span overlaps: (its feature, first and end embedding row, first input row).
    rope_positions: np.ndarray | None = None
    mm_spans: list[tuple[MultiModalFeature, int, int, int]] = field(default_factory=list)

    @property
    def is_decode(self) -> bool:
        """Every span computes exactly one token."""
        return self.input_ids.shape[0] == self.seq_lens.shape[0]


def prepare_step_inputs(
    step: SchedulerOutput,
    states: SequenceStates,
    block_size: int,
    last_rows: dict[str, int],
) -> StepInputs:
    """Flat inputs of ``step``; ``last_rows`` maps sequence id -> row of the previous step's
    sampled ids (for tokens still on the device).

    One Python pass over the spans collects what only the sequences know (token ids, rows of
    the block table, which rows sample); positions, KV slots and block tables are then
    vectorized over the whole batch.
    """
    num = len(step.scheduled)
    rows = np.empty(num, dtype=np.int64)
    starts = np.empty(num, dtype=np.int64)
    counts = np.empty(num, dtype=np.int64)
    ids: list[int] = []
    fix_rows: list[int] = []
    fix_src: list[int] = []
    logit_rows: list[int] = []
    sample_rows: list[SamplingRow] = []
    sample_src: list[int] = []
    sample_ids: list[str] = []
    prompt_spans: list[tuple[str, int, int, int]] = []
    prompt_rows: list[int] = []
    prompt_targets: list[int] = []
    drafts_by_seq: dict[str, list[int]] = {}
    total = 0
    for b, sched in enumerate(step.scheduled):
        seq = states[sched.seq_id]
        start, count = sched.num_computed_tokens, sched.num_new_tokens
        end = start + count
        rows[b], starts[b], counts[b] = seq.row, start, count
        num_prompt = len(seq.prompt_token_ids)
        known = seq.tokens(start, end)
        ids.extend(known)
        drafts = sched.draft_token_ids
        if drafts:  # speculative: the span ends with tokens to verify
            assert len(known) + len(drafts) == count, f"{sched.seq_id}: drafts misplaced"
            ids.extend(drafts)
            drafts_by_seq[sched.seq_id] = drafts
        elif len(known) < count:  # the last token is still on the device
            missing = count - len(known)
            assert missing == 1, f"{sched.seq_id}: {missing} tokens missing on the worker"
            ids.append(0)
            fix_rows.append(total + count - 1)
            fix_src.append(last_rows[sched.seq_id])
        k = seq.params.prompt_logprobs
        lo = max(start, seq.params.prompt_logprobs_start)  # positions before it: not asked for
        stop = min(end, num_prompt - 1)
        if k is not None and seq.index == 0 and lo < stop:
            prompt_spans.append((seq.seq_id, lo, stop - lo, k))
            first = len(logit_rows)
            prompt_rows.extend(range(first, first + stop - lo))
            logit_rows.extend(range(total + lo - start, total + stop - start))
            prompt_targets.extend(seq.prompt_token_ids[lo + 1 : stop + 1])
        total += count
        if drafts:  # one sample per draft position and one past them, all for this sequence
            for i in range(len(drafts) + 1):
                logit_rows.append(total - 1 - len(drafts) + i)
                sample_rows.append(
                    SamplingRow(
                        seq.params,
                        seq.prompt_token_ids,
                        seq.output_token_ids,
                        seq.generator,
                        num_output_tokens=end - len(drafts) - num_prompt + i,
                        logit_bias=seq.params.logit_bias,
                    )
                )
                sample_src.append(len(logit_rows) - 1)
                sample_ids.append(sched.seq_id)
        elif sched.sample_seq_ids:
            logit_rows.append(total - 1)
            for sid in sched.sample_seq_ids:
                target = seq if sid == sched.seq_id else states[sid]
                sample_rows.append(
                    SamplingRow(
                        target.params,
                        target.prompt_token_ids,
                        target.output_token_ids,
                        target.generator,
                        num_output_tokens=end - num_prompt,
                        logit_bias=target.params.logit_bias,
                    )
                )
                sample_src.append(len(logit_rows) - 1)
                sample_ids.append(sid)

    query_start = np.zeros(num + 1, dtype=np.int32)
    np.cumsum(counts, out=query_start[1:])
    seq_lens = starts + counts
    if total == num:  # decode: one token per span
        positions, token_rows = starts, rows
    else:
        offsets = np.repeat(starts - query_start[:-1], counts)
        positions = offsets + np.arange(total, dtype=np.int64)
        token_rows = np.repeat(rows, counts)
    table = states.block_table.array
    slots = table[token_rows, positions // block_size].astype(np.int64)
    slots *= block_size
    slots += positions % block_size
    width = -(-int(seq_lens.max()) // block_size) if num else 0
    rope, mm_spans = None, []
    if states.num_mm:  # a sequence with images is live: M-RoPE ids and image rows
        rope, mm_spans = _multimodal_inputs(step, states, positions, query_start)
    return StepInputs(
        input_ids=np.array(ids, dtype=np.int64),
        positions=positions,
        slot_mapping=slots,
        query_start=query_start,
        seq_lens=seq_lens.astype(np.int32),
        block_tables=table[rows, :width],
        fix_rows=fix_rows,
        fix_src=fix_src,
        logit_rows=logit_rows,
        sample_rows=sample_rows,
        sample_src=sample_src,
        sample_ids=sample_ids,
        prompt_spans=prompt_spans,
        prompt_rows=prompt_rows,
        prompt_targets=prompt_targets,
        drafts=drafts_by_seq,
        rope_positions=rope,
        mm_spans=mm_spans,
    )


def _multimodal_inputs(
    step: SchedulerOutput, states: SequenceStates, positions: np.ndarray, query_start: np.ndarray
) -> tuple[np.ndarray | None, list[tuple[MultiModalFeature, int, int, int]]]:
    """M-RoPE ids of the step's rows (None: all equal to ``positions``) and its image rows."""
    rope: np.ndarray | None = None
    spans: list[tuple[MultiModalFeature, int, int, int]] = []
    for b, sched in enumerate(step.scheduled):
        seq = states[sched.seq_id]
        if seq.mrope is None:
            continue
        if rope is None:
            rope = np.repeat(positions[None, :], 3, axis=0)
        start, end = sched.num_computed_tokens, sched.end
        row0 = int(query_start[b])
        num_prompt = seq.num_prompt_tokens
        in_prompt = max(0, min(end, num_prompt) - start)
        rope[:, row0 : row0 + in_prompt] = seq.mrope[:, start : start + in_prompt]
        rope[:, row0 + in_prompt : row0 + end - start] += seq.mrope_delta
        for f in seq.mm_features:
            lo, hi = max(start, f.offset), min(end, f.end)
            if lo < hi:
                spans.append((f, lo - f.offset, hi - f.offset, row0 + lo - start))
    if rope is not None and (rope[0] == rope[1]).all() and (rope[0] == rope[2]).all():
        return rope[0], spans
    return rope, spans
