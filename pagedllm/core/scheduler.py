"""Token-budget scheduler without prefill/decode phases (the vLLM v1 idea).

Every step, each running request is given the tokens it still needs (a prompt chunk or one
decode token) within ``max_num_batched_tokens``, oldest first; then waiting requests are
admitted (arrival order; with ``scheduling_policy="priority"``, lower priority value first)
while budget, seats and KV blocks last. When the pool runs dry the newest running request is
preempted: its blocks are freed and it is recomputed later (the prefix cache usually gives most
of them back).

Seats: never more than ``max_num_seqs`` sequences run. A leader of n > 1 sequences claims
seats for the siblings it forks once its prompt is computed, capped at ``max_num_seqs`` so it
can always start once the batch drains; siblings that find no seat at fork time queue right
behind it and recompute their prompt (usually from the prefix cache) when a seat frees.
"""

from __future__ import annotations

import bisect
import operator
from dataclasses import dataclass, field

from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_manager import KVCacheManager
from pagedllm.core.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    """Tokens ``[start, start + num_new_tokens)`` of ``request`` are computed this step.

    ``samples``: the chunk reaches the request's last token, so a new token is sampled. With
    async scheduling the last token may itself still be on the device (``num_pending``).
    """

    request: Request
    num_new_tokens: int
    block_ids: list[int]
    start: int = -1
    samples: bool = False

    def __post_init__(self) -> None:
        if self.start < 0:
            req = self.request
            self.start = req.num_computed_tokens
            self.samples = self.start + self.num_new_tokens == req.num_tokens_with_pending

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: EngineConfig, num_blocks: int) -> None:
        assert config.max_num_batched_tokens is not None and config.max_model_len is not None
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.chunked_prefill = config.enable_chunked_prefill
        self.block_size = config.block_size
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        by_priority = config.scheduling_policy == "priority"
        self._key = operator.attrgetter("sort_key" if by_priority else "arrival_key")

    # ---- admission and removal -------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue a request; raises ValueError if it could never fit in the KV pool."""
        if req.request_id in self.requests:
            raise ValueError(f"Request id {req.request_id!r} is already in use.")
        longest = min(req.num_prompt_tokens + req.max_tokens, self.max_model_len)
        need = self.kv.max_blocks_for(longest)
        if need > self.kv.pool.num_blocks:
            raise ValueError(
                f"Request {req.group_id!r} needs up to {longest} tokens ({need} KV blocks) but the "
                f"KV cache holds only {self.kv.pool.num_blocks} blocks of {self.block_size} "
                "tokens; lower max_tokens or give the KV cache more memory."
            )
        self.requests[req.request_id] = req
        self._enqueue(self.waiting, req)

    def _enqueue(self, queue: list[Request], req: Request) -> None:
        bisect.insort(queue, req, key=self._key)

    def _seats(self, req: Request) -> int:
        """Seats ``req`` claims: itself plus the siblings it has yet to fork (so they can share
        its prompt blocks), at most all of them, so that any group can start on an empty batch.
        """
        return min(1 + len(req.pending_forks), self.max_num_seqs)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        """Finish (e.g. abort) requests wherever they are; their blocks return to the pool."""
        done = []
        for rid in request_ids:
            req = self.requests.pop(rid, None)
            if req is None:
                continue
            if req in self.running:
                self.running.remove(req)
            elif req in self.waiting:
                self.waiting.remove(req)
            self.kv.free(req)
            req.status = status
            done.append(req)
            for child in req.pending_forks:  # never started: finish with the parent
                child.status = status
                done.append(child)
            req.pending_forks = []
        return done

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- one step --------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = req.num_tokens_with_pending - req.num_computed_tokens
            if (num_new > budget and not self.chunked_prefill) or self._finishes_on_pending(req):
                i += 1  # a fork's tail waits for room; a request ending on its pending token waits
                continue
            num_new = min(num_new, budget)
            while not self.kv.allocate(req, num_new):
                victim = self.running.pop()  # newest / lowest priority
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:
                break
            self._add(out, req, num_new)
            budget -= num_new
            i += 1
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _finishes_on_pending(self, req: Request) -> bool:
        """Its in-flight token is its last (max_tokens / max_model_len): nothing to schedule."""
        if not req.num_pending:
            return False
        return (
            req.num_output_tokens + req.num_pending >= req.max_tokens
            or req.num_tokens_with_pending >= self.max_model_len
        )

    def _add(self, out: SchedulerOutput, req: Request, num_new: int) -> None:
        """Schedule ``num_new`` tokens of ``req`` and count them as computed from now on."""
        sched = ScheduledRequest(req, num_new, self.kv.block_ids(req.request_id))
        out.scheduled.append(sched)
        req.num_computed_tokens += num_new
        if sched.samples:
            req.num_pending += 1

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        seats = sum(self._seats(r) for r in self.running)  # <= max_num_seqs at all times
        while self.waiting and budget > 0:
            req = self.waiting[0]
            if req.num_pending:  # preempted with a token in flight: admit once it has landed
                break
            if seats + self._seats(req) > self.max_num_seqs:
                break
            cached = self.kv.find_cached_prefix(req) if req.num_computed_tokens == 0 else []
            num_cached = len(cached) * self.block_size
            num_new = req.num_tokens - req.num_computed_tokens - num_cached
            if num_new > budget:
                if not self.chunked_prefill:
                    break
                num_new = budget
            if not self.kv.allocate(req, num_new, cached):
                break
            self.waiting.pop(0)
            req.num_computed_tokens += num_cached
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
                self.kv.prefix_queries += req.num_prompt_tokens
                self.kv.prefix_hits += num_cached
            req.status = RequestStatus.RUNNING
            seats += self._seats(req)
            self._enqueue(self.running, req)
            self._add(out, req, num_new)
            budget -= num_new

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(self.waiting, req)

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens, fork n > 1 siblings, finish requests.

        Returns every sequence that received a token (finished or not).
        """
        changed: list[Request] = []
        for sched in out.scheduled:
            req = sched.request
            if req.is_finished:
                continue  # finished (stop string, abort) while this step was in flight
            running = req.status == RequestStatus.RUNNING
            if running:
                self.kv.commit_computed(req, sched.end)
            if not sched.samples:
                continue
            req.num_pending -= 1
            for child in self._fork(req, sched.end):
                self._append(child, sampled[child.request_id])
                changed.append(child)
            self._append(req, sampled[req.request_id])
            changed.append(req)
        return changed

    def _fork(self, req: Request, num_computed: int) -> list[Request]:
        """Start the n > 1 siblings of ``req``, whose first tokens were just sampled.

        Siblings that find a seat (the leader's claim guarantees it ``_seats(req) - 1``) share
        the leader's computed prompt blocks. The others, and all of them if the leader was
        preempted meanwhile, wait and start from scratch: the prefix cache usually gives the
        prompt back.
        """
        if not req.pending_forks:
            return []
        children, req.pending_forks = req.pending_forks, []
        free = 0
        if req.status == RequestStatus.RUNNING:
            free = self.max_num_seqs - 1 - sum(self._seats(r) for r in self.running if r is not req)
        for j, child in enumerate(children):
            child.num_cached_tokens = req.num_cached_tokens
            self.requests[child.request_id] = child
            if j < free:
                self.kv.fork(req, child, num_computed)
                child.status = RequestStatus.RUNNING
                self._enqueue(self.running, child)
            else:
                self._enqueue(self.waiting, child)
        return children

    def _append(self, req: Request, token: int) -> None:
        req.append_output_token(token)
        params = req.params
        if token in params.all_stop_token_ids and req.num_output_tokens >= params.min_tokens:
            req.stop_reason = token if token in (params.stop_token_ids or []) else None
            self.finish_requests([req.request_id], RequestStatus.FINISHED_STOPPED)
        elif req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len:
            self.finish_requests([req.request_id], RequestStatus.FINISHED_LENGTH)

    # ---- stats -----------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
