"""Typed engine stats: what the engine process reports about itself, as one frozen dataclass.

The stats cross a process boundary (built by ``core_proc.EngineCore`` in the engine process,
read by ``AsyncLLM``, the server's ``/metrics`` and the benchmarks in the API process). As a
``dict[str, float]`` their names were spelled in half a dozen places and a typo read as a
silent 0; as dataclass fields they are spelled once, documented here, and checked by attribute
access (and type checkers) wherever they are read.

Two levels, because the engine alone cannot count everything:

* ``SchedulerStats`` is what ``LLMEngine.stats()`` knows on its own: the scheduler's queues,
  the KV cache and the scheduler's cumulative counters. The offline ``LLM`` and the benchmarks
  read it.
* ``EngineStats`` adds the counters that ``EngineCore`` keeps around the engine (requests
  received and finished, prompt and generation tokens, steps), since ``LLMEngine`` forgets a
  request once it has finished. It is what ``EngineReady``, ``EngineOutputs`` and ``Heartbeat``
  carry, and what ``AsyncLLM.get_stats()`` returns.

Counters (``*_total``, ``num_preemptions``, ``prefix_cache_*``, ``requests_finished_*``) only
grow over an engine's life; gauges (the rest) describe the moment. The engine sends stats with
every step, so they pickle positionally (``__reduce__``): ~90 bytes rather than ~400 with the
field names. Both processes run the same code ("spawn"), so the field order always agrees.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    """``LLMEngine.stats()``: its scheduler and KV cache at one moment. ``num_running`` and
    ``num_waiting`` count sequences (a request with n > 1 counts once per completion in that
    queue); ``num_unfinished_requests`` counts requests."""

    # ---- gauges ----
    num_running: int
    """Sequences in the running batch."""
    num_waiting: int
    """Sequences waiting to be scheduled (new or preempted)."""
    kv_cache_usage: float
    """Fraction of the KV blocks in use: 0.0 to 1.0."""
    num_kv_blocks: int
    """Size of the KV-cache pool in blocks (fixed at start-up)."""
    num_unfinished_requests: int
    """Requests added and not yet finished (waiting, running or in the output processor)."""
    # ---- counters ----
    num_preemptions: int
    """Sequences preempted (to be recomputed) for lack of KV blocks."""
    prefix_cache_queries: int
    """Prompt tokens looked up in the prefix cache (on each admission, preemption included)."""
    prefix_cache_hits: int
    """Of ``prefix_cache_queries``, the tokens served from the cache."""

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:
        # Positional: the field names would be most of the pickle (see the module docstring).
        return type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclasses.dataclass(frozen=True)
class EngineStats(SchedulerStats):
    """The engine process's stats: ``SchedulerStats`` plus the counters ``EngineCore`` keeps
    across requests. Sent with ``EngineReady``, every ``EngineOutputs`` and a ``Heartbeat``
    whenever they changed while idle."""

    requests_received_total: int
    """``AddRequest`` messages received, rejected ones included (``AsyncLLM`` compares it with
    the requests it has sent to count those still on their way)."""
    prompt_tokens_total: int
    """Prompt tokens of requests whose prompt has been computed: counted once per request, when
    its first token has been generated (a request aborted before that does not count)."""
    generation_tokens_total: int
    """Tokens generated, over all completions (finished requests and those still running)."""
    num_steps_total: int
    """Engine steps run."""
    requests_finished_stop: int
    """Completions that finished on a stop condition (EOS, stop token or string)."""
    requests_finished_length: int
    """Completions that finished at ``max_tokens`` or the model's length limit."""
    requests_finished_abort: int
    """Completions aborted (by the client, a timeout or a disconnect)."""
