"""The step contract: what the scheduler tells the worker each step, as plain data.

The worker keeps per-sequence state (sampling parameters, generator, token ids, block table)
from a sequence's first schedule until it finishes, so a step only carries what changed:

* ``new_sequences``: sequences the worker has not seen, sent once with everything it needs
  (prompt, parameters, seed, blocks);
* ``scheduled``: the batch in order, one ``ScheduledSequence`` per sequence that computes tokens
  this step, with the diffs since the worker last saw it (new blocks, tokens the host learnt);
* ``finished_seq_ids``: state the worker can drop.

Nothing here holds a live object (no torch tensor, no generator, no scheduler ``Sequence``): a
step pickles, so it can be broadcast to tensor-parallel workers in other processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedllm.sampling_params import SamplingParams


@dataclass(slots=True)
class MultiModalFeature:
    """One image of a prompt, as plain data: where its placeholder tokens are, what the vision
    encoder needs to compute their embeddings, and the image's content hash (the prefix cache
    keys blocks holding its tokens by it, and the worker's encoder cache shares one result per
    hash).

    ``pixel_values`` is the image processor's output, a float32 numpy array
    ``[num_patches, patch_dim]``; ``grid_thw`` its (t, h, w) patch grid. The placeholder span
    is prompt positions ``[offset, offset + length)``, one per encoder output row.
    """

    offset: int
    length: int
    content_hash: bytes
    pixel_values: Any
    grid_thw: tuple[int, int, int]

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(slots=True)
class NewSequenceData:
    """A sequence the worker has not seen yet (its first step, or it was forked)."""

    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int | None  # the sequence's own generator seed (params.seed + its index)
    index: int = 0  # which of the request's n completions (0 computes prompt logprobs)
    mm_features: list[MultiModalFeature] = field(default_factory=list)  # by offset


@dataclass(slots=True)
class ScheduledSequence:
    """Tokens ``[num_computed_tokens, num_computed_tokens + num_new_tokens)`` of ``seq_id``
    run this step.

    ``new_token_ids`` are output tokens the host has learnt since it last sent this sequence;
    the worker appends them to its copy. Positions past the worker's copy are tokens sampled
    by the previous step and still on the device (async scheduling): the worker takes them
    from that step's sampled ids. ``block_ids`` extends the sequence's block table, or replaces
    it when ``reset_blocks`` (first schedule, resumed after preemption, forked onto a parent's
    blocks). ``sample_seq_ids`` are the sequences sampled from this span's last row, in order:
    empty for a prompt chunk that does not reach the end, the sequence itself otherwise, plus
    its n > 1 siblings on its first sampled token.

    ``draft_token_ids`` (speculative decoding) are proposed continuations, the last
    ``len(draft_token_ids)`` of the span's tokens: the worker computes them like any token and
    samples every one of the span's last ``1 + len(draft_token_ids)`` positions; it returns the
    drafts that match what it sampled, in order, plus the first sample that does not (or one
    past the last draft). The scheduler then rolls ``num_computed_tokens`` back over the
    rejected drafts, whose KV entries the next step overwrites.
    """

    seq_id: str
    num_computed_tokens: int
    num_new_tokens: int
    block_ids: list[int]
    reset_blocks: bool = False
    new_token_ids: list[int] = field(default_factory=list)
    sample_seq_ids: list[str] = field(default_factory=list)
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.num_computed_tokens + self.num_new_tokens

    @property
    def samples(self) -> bool:
        return bool(self.sample_seq_ids)


@dataclass
class SchedulerOutput:
    """One step, as the worker receives it (see the module doc)."""

    new_sequences: list[NewSequenceData] = field(default_factory=list)
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    finished_seq_ids: list[str] = field(default_factory=list)
    preempted_seq_ids: list[str] = field(default_factory=list)
    # Structured output: the sampled sequences whose next token is constrained, and their rows
    # of the allowed-token bitmask (an int32 numpy array [len, ceil(V / 32)]: bit t % 32 of
    # word t // 32 set = token t allowed), filled by the engine after scheduling.
    structured_seq_ids: list[str] = field(default_factory=list)
    grammar_bitmask: Any = None

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class TokenLogprobs:
    """Logprobs at one position: the chosen token first, then the top-k alternatives."""

    token_ids: list[int]
    logprobs: list[float]
    rank: int


@dataclass
class ModelRunnerOutput:
    """What a step produced, by sequence id: possibly several tokens per sequence (the engine
    handles any count; today's runner samples one)."""

    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # sequence id -> (first prompt position these cover, one entry per position)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
