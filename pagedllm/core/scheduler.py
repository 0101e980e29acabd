"""Token-budget scheduler without prefill/decode phases (the vLLM v1 idea).

Every step, each running request is given the tokens it still needs (a prompt chunk or one
decode token) within ``max_num_batched_tokens``, oldest first; then waiting requests are
admitted (arrival order; with ``scheduling_policy="priority"``, lower priority value first)
while budget, seats and KV blocks last. When the pool runs dry the newest running request is
preempted: its blocks are freed and it is recomputed later (the prefix cache usually gives most
of them back).

The output of ``schedule()`` is plain data (``scheduler_output.py``): new sequences once, then
per-step diffs. A sequence whose sampling reads its own previous tokens on the host
(penalties) is not scheduled while its last token is still on the device, so with async
scheduling it waits one step; every other sequence stays a step ahead.

Speculative decoding hook: with a ``drafter`` set, a decoding sequence may compute up to
``num_speculative_tokens`` draft tokens after its own in the same step; the worker verifies
them and the scheduler rolls ``num_computed_tokens`` back over the rejected ones (such a
sequence, like a penalized one, waits for its tokens before its next step). Nothing sets a
drafter yet: it is the contract a drafter (n-gram, a draft model) will plug into.

Images: a prompt span that reaches an image the worker has not encoded yet costs the image's
embedding count from the step's encoder budget (``max_num_encoder_tokens``); a span that would
overdraw it stops before the image (the rest waits for a later step).

Seats: never more than ``max_num_seqs`` sequences run. A leader of n > 1 sequences claims
seats for the siblings it forks once its prompt is computed, capped at ``max_num_seqs`` so it
can always start once the batch drains; siblings that find no seat at fork time queue right
behind it and recompute their prompt (usually from the prefix cache) when a seat frees.
"""

from __future__ import annotations

import bisect
import operator
import time
from collections.abc import Callable

from pagedllm.config.cache import CacheConfig
from pagedllm.config.scheduler import SchedulerConfig, encoder_token_budget
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.scheduler_output import (
    NewSequenceData,
    ScheduledSequence,
    SchedulerOutput,
)
from pagedllm.core.sequence import Sequence, SequenceStatus

# Proposes draft tokens for a running sequence (speculative decoding): at most ``k`` tokens
# that may follow its current tokens. None of them has to be right: the worker verifies them.
Drafter = Callable[[Sequence, int], list[int]]


class Scheduler:
    """Decides, every step, which sequences compute which tokens (see the module doc)."""

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        max_model_len: int,
        num_blocks: int,
    ) -> None:
        """``scheduler_config`` with ``max_num_batched_tokens`` resolved (as ``EngineConfig``
        leaves it); ``num_blocks``: the KV pool's size, decided by the worker."""
        assert scheduler_config.max_num_batched_tokens is not None
        self.max_num_seqs = scheduler_config.max_num_seqs
        self.max_num_batched_tokens = scheduler_config.max_num_batched_tokens
        self.max_model_len = max_model_len
        self.chunked_prefill = scheduler_config.enable_chunked_prefill
        self.max_num_encoder_tokens = encoder_token_budget(scheduler_config)
        self._encoder_budget = 0  # what is left of it in the step being built
        self.block_size = cache_config.block_size
        self.kv = KVCacheManager(
            num_blocks, cache_config.block_size, cache_config.enable_prefix_caching
        )
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.sequences: dict[str, Sequence] = {}
        self.num_preemptions = 0
        self._finished_on_worker: list[str] = []  # sent with the next step
        # The sequences of each step not yet updated (by id of its SchedulerOutput): an id may
        # be reused once its sequence finished while a step naming it is still in flight.
        self._in_flight: dict[int, list[Sequence]] = {}
        self._step_seqs: list[Sequence] = []  # the step being built, in its scheduled order
        # Speculative decoding: who proposes drafts and how many per step (none by default).
        self.drafter: Drafter | None = None
        self.num_speculative_tokens = 0
        by_priority = scheduler_config.scheduling_policy == "priority"
        self._key = operator.attrgetter("sort_key" if by_priority else "arrival_key")

    # ---- admission and removal -------------------------------------------------------
    def add_sequence(self, seq: Sequence) -> None:
        """Queue a sequence; raises ValueError if it could never fit in the KV pool."""
        if seq.seq_id in self.sequences:
            raise ValueError(f"Request id {seq.seq_id!r} is already in use.")
        longest = min(seq.num_prompt_tokens + seq.max_tokens, self.max_model_len)
        need = self.kv.max_blocks_for(longest)
        if need > self.kv.pool.num_blocks:
            raise ValueError(
                f"Request {seq.request_id!r} needs up to {longest} tokens ({need} KV blocks) but "
                f"the KV cache holds only {self.kv.pool.num_blocks} blocks of {self.block_size} "
                "tokens; lower max_tokens or give the KV cache more memory."
            )
        image_tokens = sum(f.length for f in seq.mm_features)
        if image_tokens > self.max_num_encoder_tokens and not self.chunked_prefill:
            raise ValueError(
                f"Request {seq.request_id!r} has {image_tokens} image tokens, more than "
                f"max_num_encoder_tokens ({self.max_num_encoder_tokens}), and without chunked "
                "prefill its prompt must run in one step."
            )
        self.sequences[seq.seq_id] = seq
        self._enqueue(self.waiting, seq)

    def _enqueue(self, queue: list[Sequence], seq: Sequence) -> None:
        bisect.insort(queue, seq, key=self._key)

    def _seats(self, seq: Sequence) -> int:
        """Seats ``seq`` claims: itself plus the siblings it has yet to fork (so they can share
        its prompt blocks), at most all of them, so that any group can start on an empty batch.
        """
        return min(1 + len(seq.pending_forks), self.max_num_seqs)

    def finish_sequences(self, seq_ids: list[str], status: SequenceStatus) -> list[Sequence]:
        """Finish (e.g. abort) sequences wherever they are; their blocks return to the pool."""
        done = []
        for sid in seq_ids:
            seq = self.sequences.pop(sid, None)
            if seq is None:
                continue
            if seq in self.running:
                self.running.remove(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)
            self.kv.free(seq)
            seq.status = status
            done.append(seq)
            for child in seq.pending_forks:  # never started: finish with the parent
                child.status = status
                done.append(child)
            seq.pending_forks = []
        for seq in done:
            if seq.on_worker:
                self._finished_on_worker.append(seq.seq_id)
                seq.on_worker = False
        return done

    def has_unfinished_sequences(self) -> bool:
        return bool(self.sequences)

    # ---- one step --------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_seq_ids=self._finished_on_worker)
        self._finished_on_worker = []
        self._step_seqs = []
        budget = self.max_num_batched_tokens
        self._encoder_budget = self.max_num_encoder_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = seq.num_tokens_with_pending - seq.num_computed_tokens
            if (
                (num_new > budget and not self.chunked_prefill)
                or self._finishes_on_pending(seq)
                or (seq.num_pending and self._waits_for_host_token(seq))
            ):
                i += 1  # waits: a fork's tail for room, a penalty sequence for its token, ...
                continue
            num_new = min(num_new, budget)
            enc = None
            if seq.mm_done < len(seq.mm_features):
                num_new, *enc = self._encoder_cut(seq, seq.num_computed_tokens, num_new)
                if num_new == 0:
                    i += 1  # its next image does not fit this step's encoder budget
                    continue
            drafts = self._drafts(seq, num_new, budget)
            num_new += len(drafts)
            while not self.kv.allocate(seq, num_new):
                victim = self.running.pop()  # newest / lowest priority
                self._preempt(victim)
                out.preempted_seq_ids.append(victim.seq_id)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            self._add(out, seq, num_new, drafts)
            if enc:
                self._encoder_budget -= enc[0]
                seq.mm_done = enc[1]
            budget -= num_new
            i += 1
        if not out.preempted_seq_ids:
            self._admit_waiting(out, budget)
        if out.scheduled:
            self._in_flight[id(out)] = self._step_seqs
        return out

    def _finishes_on_pending(self, seq: Sequence) -> bool:
        """Its in-flight token is its last (max_tokens / max_model_len): nothing to schedule."""
        if not seq.num_pending:
            return False
        return (
            seq.num_output_tokens + seq.num_pending >= seq.max_tokens
            or seq.num_tokens_with_pending >= self.max_model_len
        )

    def _waits_for_host_token(self, seq: Sequence) -> bool:
        """With its last token still on the device, ``seq`` is not scheduled: its sampling
        reads its tokens (penalties), the step in flight verifies drafts (which of its samples
        is the last token is known only on the host), or it is to get drafts."""
        return seq.params.needs_host_tokens or seq.drafts_in_flight or self._drafts_for(seq)

    def _drafts_for(self, seq: Sequence) -> bool:
        """The drafter proposes for ``seq``: one is set and the sequence's sampling reads
        nothing that drafts would change (penalties, a grammar, logprobs, min_tokens, siblings
        to fork).
        Such a sequence, like a penalized one, waits for its last token to reach the host."""
        params = seq.params
        return not (
            self.drafter is None
            or seq.pending_forks
            or params.needs_host_tokens
            or params.structured_outputs is not None
            or params.logprobs is not None
            or seq.num_output_tokens < params.min_tokens
        )

    def _drafts(self, seq: Sequence, num_new: int, budget: int) -> list[int]:
        """Draft tokens for a sequence about to decode one token whose last token is on the
        host, as many as the step budget, ``max_tokens`` and ``max_model_len`` leave room for."""
        if num_new != 1 or seq.num_pending or not self._drafts_for(seq):
            return []
        assert self.drafter is not None
        room = min(
            self.num_speculative_tokens,
            budget - 1,
            seq.max_tokens - seq.num_output_tokens - 1,
            self.max_model_len - seq.num_tokens - 1,
        )
        return list(self.drafter(seq, room))[:room] if room > 0 else []

    def _add(
        self, out: SchedulerOutput, seq: Sequence, num_new: int, drafts: list[int] | None = None
    ) -> None:
        """Schedule ``num_new`` tokens of ``seq`` (the last ``len(drafts)`` of them drafts; as a
        diff for the worker) and count them as computed from now on."""
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.monotonic()
        self._step_seqs.append(seq)
        drafts = drafts or []
        start = seq.num_computed_tokens
        samples = start + num_new == seq.num_tokens_with_pending + len(drafts)
        sample_ids: list[str] = []
        if samples:
            sample_ids.append(seq.seq_id)
            if seq.num_output_tokens + seq.num_pending == 0:  # first token: siblings too
                sample_ids.extend(c.seq_id for c in seq.pending_forks)
                for child in seq.pending_forks:
                    out.new_sequences.append(self._new_data(child))
        if not seq.on_worker:
            out.new_sequences.append(self._new_data(seq))
        reset = seq.blocks_sent < 0
        num_blocks = self.kv.num_blocks_of(seq.seq_id)
        if reset or num_blocks > seq.blocks_sent:
            block_ids = self.kv.block_ids_from(seq.seq_id, 0 if reset else seq.blocks_sent)
        else:
            block_ids = []
        out.scheduled.append(
            ScheduledSequence(
                seq_id=seq.seq_id,
                num_computed_tokens=start,
                num_new_tokens=num_new,
                block_ids=block_ids,
                reset_blocks=reset,
                new_token_ids=seq.all_token_ids[seq.num_tokens_sent :],
                sample_seq_ids=sample_ids,
                draft_token_ids=drafts,
            )
        )
        seq.drafts_in_flight = bool(drafts)
        seq.blocks_sent = num_blocks
        seq.num_tokens_sent = seq.num_tokens
        seq.num_computed_tokens += num_new
        if samples:
            seq.num_pending += 1

    @staticmethod
    def _new_data(seq: Sequence) -> NewSequenceData:
        """The worker learns ``seq`` now: its prompt here, its outputs as ``new_token_ids``."""
        seq.on_worker = True
        seq.num_tokens_sent = seq.num_prompt_tokens
        return NewSequenceData(
            seq.seq_id, seq.prompt_token_ids, seq.params, seq.seed, seq.index, seq.mm_features
        )

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        seats = sum(self._seats(r) for r in self.running)  # <= max_num_seqs at all times
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if seq.num_pending:  # preempted with a token in flight: admit once it has landed
                break
            if seats + self._seats(seq) > self.max_num_seqs:
                break
            cached = self.kv.find_cached_prefix(seq) if seq.num_computed_tokens == 0 else []
            num_cached = len(cached) * self.block_size
            num_new = seq.num_tokens - seq.num_computed_tokens - num_cached
            if num_new > budget:
                if not self.chunked_prefill:
                    break
                num_new = budget
            enc = None
            if seq.mm_done < len(seq.mm_features):
                num_new, *enc = self._encoder_cut(
                    seq, seq.num_computed_tokens + num_cached, num_new
                )
                if num_new == 0:
                    break
            if not self.kv.allocate(seq, num_new, cached):
                break
            if enc:
                self._encoder_budget -= enc[0]
                seq.mm_done = enc[1]
            self.waiting.pop(0)
            seq.num_computed_tokens += num_cached
            if seq.num_cached_tokens < 0:
                seq.num_cached_tokens = num_cached
                self.kv.prefix_queries += seq.num_prompt_tokens
                self.kv.prefix_hits += num_cached
            seq.status = SequenceStatus.RUNNING
            seats += self._seats(seq)
            self._enqueue(self.running, seq)
            self._add(out, seq, num_new)
            budget -= num_new

    def _encoder_cut(self, seq: Sequence, start: int, num_new: int) -> tuple[int, int, int]:
        """(how many of ``num_new`` tokens from ``start`` fit the step's encoder budget, the
        encoder tokens they need, ``mm_done`` once they are scheduled). 0 tokens: none fit;
        without chunked prefill, all or none."""
        feats = seq.mm_features
        end, cost, k = start + num_new, 0, seq.mm_done
        while k < len(feats) and feats[k].offset < end:
            f = feats[k]
            if f.end > start:  # not wholly behind computed (or cached) tokens: encode it
                if cost + f.length > self._encoder_budget:
                    fits = f.offset - start if f.offset > start else 0
                    if fits < num_new and not self.chunked_prefill:
                        fits = 0
                    return self._encoder_cut(seq, start, fits) if fits else (0, 0, seq.mm_done)
                cost += f.length
            k += 1
        return num_new, cost, k

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_computed_tokens = 0
        seq.blocks_sent = -1
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(self.waiting, seq)

    def update_from_output(
        self, out: SchedulerOutput, sampled: dict[str, list[int]]
    ) -> list[tuple[Sequence, list[int]]]:
        """Advance computed counts, append sampled tokens (any number per sequence), fork
        n > 1 siblings, finish sequences.

        Returns every sequence that received tokens, with the tokens it kept (a stop token
        ends the list).
        """
        changed: list[tuple[Sequence, list[int]]] = []
        seqs = self._in_flight.pop(id(out), None)
        if seqs is None:  # a copy of the step (e.g. it crossed a process): look the ids up
            seqs = [self.sequences.get(s.seq_id) for s in out.scheduled]
        for sched, seq in zip(out.scheduled, seqs, strict=True):
            if seq is None or seq.is_finished:
                continue  # finished (stop string, abort) while this step was in flight
            running = seq.status == SequenceStatus.RUNNING
            end = sched.end
            if sched.draft_token_ids and sched.samples:
                # Drafts past the first mismatch were computed for nothing: their KV entries
                # are overwritten when the step after recomputes from the last accepted one.
                rejected = len(sched.draft_token_ids) + 1 - len(sampled[seq.seq_id])
                end -= rejected
                if running:
                    seq.num_computed_tokens -= rejected
            if running:
                self.kv.commit_computed(seq, end)
            if not sched.samples:
                continue
            seq.num_pending -= 1
            seq.drafts_in_flight = False
            for child in self._fork(seq, sched.end):
                changed.append((child, self._append(child, sampled[child.seq_id])))
            changed.append((seq, self._append(seq, sampled[seq.seq_id])))
        return changed

    def _fork(self, seq: Sequence, num_computed: int) -> list[Sequence]:
        """Start the n > 1 siblings of ``seq``, whose first tokens were just sampled.

        Siblings that find a seat (the leader's claim guarantees it ``_seats(seq) - 1``) share
        the leader's computed prompt blocks. The others, and all of them if the leader was
        preempted meanwhile, wait and start from scratch: the prefix cache usually gives the
        prompt back.
        """
        if not seq.pending_forks:
            return []
        children, seq.pending_forks = seq.pending_forks, []
        free = 0
        if seq.status == SequenceStatus.RUNNING:
            free = self.max_num_seqs - 1 - sum(self._seats(r) for r in self.running if r is not seq)
        for j, child in enumerate(children):
            child.num_cached_tokens = seq.num_cached_tokens
            self.sequences[child.seq_id] = child
            if j < free:
                self.kv.fork(seq, child, num_computed)
                child.status = SequenceStatus.RUNNING
                self._enqueue(self.running, child)
            else:
                self._enqueue(self.waiting, child)
        return children

    def _append(self, seq: Sequence, tokens: list[int]) -> list[int]:
        """Append ``tokens`` up to the first that ends the sequence; return those kept."""
        params = seq.params
        for i, token in enumerate(tokens):
            seq.append_output_token(token)
            if token in params.all_stop_token_ids and seq.num_output_tokens >= params.min_tokens:
                seq.stop_reason = token if token in (params.stop_token_ids or []) else None
                self.finish_sequences([seq.seq_id], SequenceStatus.FINISHED_STOPPED)
            elif seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
                self.finish_sequences([seq.seq_id], SequenceStatus.FINISHED_LENGTH)
            else:
                continue
            return tokens[: i + 1]
        return list(tokens)

    # ---- stats -----------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
