"""One sequence being generated: its tokens, progress, status and prefix-block hashes.

A user request with ``n`` completions is ``n`` sequences sharing a ``request_id``; each has its
own ``seq_id``. The scheduler moves sequences; the worker receives them as plain data
(``scheduler_output.py``), never as these objects.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from pagedllm.core.scheduler_output import MultiModalFeature
from pagedllm.sampling_params import SamplingParams

_ORDER = itertools.count()


class SequenceStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= SequenceStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {3: "stop", 4: "length", 5: "abort"}.get(int(self))


@dataclass(eq=False)
class Sequence:
    """A sequence the scheduler moves forward: ``num_computed_tokens`` chases ``num_tokens``.

    ``seq_id`` is unique per sequence; ``request_id`` is the user's request id (the n > 1
    completions of one prompt share it; ``index`` tells them apart). A sequence with
    ``pending_forks`` shares its prompt blocks with those siblings once its prompt has been
    computed: they start from its KV blocks instead of prefilling again. ``seed`` is this
    sequence's own sampling seed; the worker owns the generator built from it.

    ``num_tokens_sent`` counts the tokens the worker has been told about, so each step sends
    only the new ones; ``on_worker`` says whether the worker holds its state.

    ``mm_features`` are the prompt's images (by offset); the first ``mm_done`` of them need
    no more encoder work (encoded by the worker, which keeps them until the sequence finishes,
    or wholly behind a prefix-cache hit).
    """

    seq_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    request_id: str = ""
    index: int = 0
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    seed: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    num_pending: int = 0  # sampled tokens still on the device (async scheduling), value unknown
    drafts_in_flight: bool = False  # the step in flight verifies drafts: wait for its tokens
    num_cached_tokens: int = -1  # prompt tokens served from the prefix cache (first schedule)
    status: SequenceStatus = SequenceStatus.WAITING
    stop_reason: int | str | None = None
    block_hashes: list[bytes] = field(default_factory=list)
    pending_forks: list[Sequence] = field(default_factory=list)
    num_tokens_sent: int = 0  # tokens the worker knows (prompt + outputs)
    on_worker: bool = False
    blocks_sent: int = -1  # block-table entries the worker knows; -1: send the whole table
    num_preemptions: int = 0
    mm_features: list[MultiModalFeature] = field(default_factory=list)
    mm_done: int = 0
    first_scheduled_time: float | None = None
    order: int = field(default_factory=lambda: next(_ORDER))

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = self.seq_id
        self.all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        return len(self.all_token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def sort_key(self) -> tuple[int, float, int]:
        """Priority scheduling order: lower priority value first, then earlier arrival."""
        return (self.priority, self.arrival_time, self.order)

    @property
    def arrival_key(self) -> tuple[float, int]:
        """FCFS scheduling order: earlier arrival first (``order`` breaks ties, so the n > 1
        siblings of a request queue right behind their leader)."""
        return (self.arrival_time, self.order)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
