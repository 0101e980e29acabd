"""The synchronous engine: validate and queue requests, then ``step()`` until done.

One step = scheduler.schedule() (plain data: ``core/scheduler_output.py``) ->
executor.execute_async() (every tensor-parallel rank's model runner) ->
scheduler.update_from_output() -> output_processor (detokenize,
stop strings, logprobs) -> ``RequestOutput``s. A request of n completions is n ``Sequence``s.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import time
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.core.sequence import Sequence, SequenceStatus
from pagedllm.engine.input_processing import InputProcessor, ProcessedInput, PromptInput
from pagedllm.engine.output_processor import OutputProcessor
from pagedllm.engine.stats import SchedulerStats
from pagedllm.engine.tokenizer import load_generation_defaults, load_tokenizer
from pagedllm.executor import make_executor
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams
from pagedllm.structured_output.backend import CompiledGrammar
from pagedllm.structured_output.manager import StructuredOutputManager
from pagedllm.worker.step_output import StepHandle

logger = logging.getLogger(__name__)


@dataclass
class _AwaitingGrammar:
    """A request set aside while its structured-output constraint compiles."""

    future: concurrent.futures.Future[CompiledGrammar]
    deadline: float  # time.monotonic() after which it fails
    prompt: PromptInput
    params: SamplingParams
    inp: ProcessedInput
    arrival: float
    priority: int


class LLMEngine:
    """Owns the tokenizer, scheduler, model runner and output processor of one engine."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        mc = config.model_config
        assert mc.tokenizer is not None and mc.model is not None and mc.max_model_len is not None
        self.tokenizer = load_tokenizer(mc.tokenizer)
        self.generation_defaults = load_generation_defaults(mc.model, self.tokenizer)
        self.input_processor = InputProcessor(config, self.tokenizer)
        self.executor = make_executor(config)  # every tensor-parallel rank's model runner
        self.runner = self.executor.runner  # rank 0's, in this process
        self.scheduler = Scheduler(
            config.scheduler_config, config.cache_config, mc.max_model_len, self.executor.num_blocks
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.structured_output = StructuredOutputManager(
            self.tokenizer, self.executor.vocab_size, sorted(self.generation_defaults.eos_token_ids)
        )
        self._groups: dict[str, list[str]] = {}  # user request id -> sequence ids
        self._pending_finished: list[Sequence] = []
        self._next_id = 0
        self._inflight: tuple[SchedulerOutput, StepHandle] | None = None  # async scheduling
        self._awaiting_grammar: dict[str, _AwaitingGrammar] = {}  # request id -> its wait
        self._request_errors: list[tuple[str, ValueError]] = []

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults applied."""
        return SamplingParams(**self.generation_defaults.sampling)

    # ---- requests ----------------------------------------------------------------------
    def new_request_id(self) -> str:
        self._next_id += 1
        return str(self._next_id - 1)

    def add_request(
        self,
        request_id: str | None,
        prompt: PromptInput,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        wait_for_grammar: bool = True,
    ) -> str:
        """Validate and queue one request (n sequences). Nothing is queued if it raises.

        A structured-output constraint that is not compiled yet is compiled here, unless
        ``wait_for_grammar`` is False (the serving engine loop): then the request waits aside
        while its grammar compiles on the compile threads, the steps of everyone else go on,
        and a constraint that fails (or runs out of time) comes back from
        ``take_request_errors`` instead of being raised.
        """
        request_id = request_id if request_id is not None else self.new_request_id()
        if request_id in self._groups or request_id in self._awaiting_grammar:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        params = copy.copy(params) if params is not None else self.default_sampling_params()
        params.update_from_generation_config(self.generation_defaults.eos_token_ids)
        inp = self.input_processor.process(prompt, params, priority)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        so = params.structured_outputs
        if so is not None:  # a bad constraint: ValueError, queue nothing
            if wait_for_grammar:
                self.structured_output.compile(so)
            else:
                future = self.structured_output.compile_async(so)
                if not future.done():
                    deadline = time.monotonic() + self.structured_output.compile_timeout_s
                    self._awaiting_grammar[request_id] = _AwaitingGrammar(
                        future, deadline, prompt, params, inp, arrival, priority
                    )
                    return request_id
                self.structured_output.compiled(so, future)
        self._queue(request_id, prompt, params, inp, arrival, priority)
        return request_id

    def _queue(
        self,
        request_id: str,
        prompt: PromptInput,
        params: SamplingParams,
        inp: ProcessedInput,
        arrival: float,
        priority: int,
    ) -> None:
        seqs = self._sequences(request_id, params, inp, arrival, priority)
        if params.structured_outputs is not None:
            for seq in seqs:
                self.structured_output.add_sequence(seq.seq_id, params.structured_outputs)
        try:
            self.scheduler.add_sequence(seqs[0])  # raises if it can never fit
        except ValueError:
            for seq in seqs:
                self.structured_output.remove_sequence(seq.seq_id)
            raise
        self._groups[request_id] = [s.seq_id for s in seqs]
        self.output_processor.add_request(_prompt_text(prompt), seqs)

    def _sequences(
        self,
        request_id: str,
        params: SamplingParams,
        inp: ProcessedInput,
        arrival: float,
        priority: int,
    ) -> list[Sequence]:
        """The n sequences of one request (siblings wait as the first one's pending forks)."""
        prompt_ids = inp.prompt_token_ids
        seqs = [
            Sequence(
                seq_id=request_id if i == 0 else f"{request_id}#{i}",
                prompt_token_ids=prompt_ids,
                params=params,
                max_tokens=inp.max_tokens,
                request_id=request_id,
                index=i,
                priority=priority,
                arrival_time=arrival,
                seed=None if params.seed is None else params.seed + i,
                mm_features=inp.mm_features,
            )
            for i in range(params.n)
        ]
        seqs[0].pending_forks = seqs[1:]
        return seqs

    def _admit_compiled(self) -> None:
        """Queue the requests whose grammar is now compiled; a failed or late one becomes a
        request error (see ``add_request``)."""
        now = time.monotonic()
        for rid, w in list(self._awaiting_grammar.items()):
            if not w.future.done() and now < w.deadline:
                continue
            del self._awaiting_grammar[rid]
            try:
                assert w.params.structured_outputs is not None
                self.structured_output.compiled(w.params.structured_outputs, w.future)
                self._queue(rid, w.prompt, w.params, w.inp, w.arrival, w.priority)
            except ValueError as e:
                self._request_errors.append((rid, e))

    def take_request_errors(self) -> list[tuple[str, ValueError]]:
        """Requests that failed after ``add_request`` returned (a constraint that did not
        compile in time or at all); each is reported once and nothing of it is queued."""
        errors, self._request_errors = self._request_errors, []
        return errors

    def has_queued_work(self) -> bool:
        """Some request is queued (not only waiting for its grammar)."""
        return bool(self._groups) or bool(self._pending_finished)

    def abort_request(self, request_ids: str | SequenceOf[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for rid in ids:
            w = self._awaiting_grammar.pop(rid, None)
            if w is not None:  # never queued: it ends at the next step with an "abort" output
                # (its compilation may go on; its result is never used)
                seqs = self._sequences(rid, w.params, w.inp, w.arrival, w.priority)
                for seq in seqs:
                    seq.status = SequenceStatus.FINISHED_ABORTED
                self._groups[rid] = [seq.seq_id for seq in seqs]
                self.output_processor.add_request(
                    w.prompt if isinstance(w.prompt, str) else None, seqs
                )
                self.output_processor.finish(seqs)
        seq_ids = [sid for rid in ids for sid in self._groups.get(rid, [])]
        done = self.scheduler.finish_sequences(seq_ids, SequenceStatus.FINISHED_ABORTED)
        self._pending_finished.extend(done)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block; False (and nothing dropped) while any request is
        in flight, whose blocks are in use."""
        if self.has_unfinished_requests() or self._inflight is not None:
            return False
        return self.scheduler.kv.pool.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups) or bool(self._awaiting_grammar)

    def get_num_unfinished_requests(self) -> int:
        return len(self._groups) + len(self._awaiting_grammar)

    # ---- one step ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step and return the outputs of requests that progressed.

        With async scheduling, step N+1 is scheduled and enqueued on the device before step
        N's sampled tokens are read back and processed, so the CPU work of both overlaps the
        GPU; outputs then trail the device by one step. The scheduler holds back, per sequence,
        those whose sampling reads their own previous tokens (penalties) until their last
        token is on the host; everyone else stays a step ahead. A step that samples constrained
        sequences (structured output) is enqueued in two halves: its forward pass, then, once
        step N's tokens have advanced the grammars on the host, its sampling with their mask.
        """
        op = self.output_processor
        self.executor.check_health()
        if self._awaiting_grammar:
            self._admit_compiled()
        if self._pending_finished:
            self._finished(self._pending_finished)
            self._pending_finished = []
        if not self.config.scheduler_config.async_scheduling:
            if self._inflight is not None:  # drain the step in flight first
                self._complete(*self._inflight)
                self._inflight = None
            else:
                sched = self._schedule()
                self.structured_output.fill_step(sched)
                handle = self.executor.execute_async(sched)
                if sched.scheduled:
                    self._complete(sched, handle)
        else:
            sched = self._schedule()
            if self.structured_output.constrains(sched):
                forward = self.executor.execute_model(sched)
                if self._inflight is not None:
                    self._complete(*self._inflight)  # step N's tokens advance the grammars
                self.structured_output.fill_step(sched)
                handle = self.executor.sample_tokens(
                    forward, sched.structured_seq_ids, sched.grammar_bitmask
                )
            else:
                handle = self.executor.execute_async(sched)  # also applies finishes when empty
                if self._inflight is not None:
                    self._complete(*self._inflight)
            handle = handle if sched.scheduled else None
            self._inflight = (sched, handle) if handle is not None else None
        outputs = op.collect()
        for out in outputs:
            if out.finished:
                self._groups.pop(out.request_id, None)
        return outputs

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (also done at interpreter exit)."""
        self.executor.shutdown()

    def _finished(self, done: list[Sequence]) -> None:
        self.output_processor.finish(done)
        for seq in done:
            self.structured_output.remove_sequence(seq.seq_id)

    def _schedule(self) -> SchedulerOutput:
        sched = self.scheduler.schedule()
        if (
            not sched.scheduled
            and self._inflight is None
            and self.scheduler.has_unfinished_sequences()
        ):
            raise RuntimeError("Scheduler made no progress with requests pending (engine bug).")
        return sched

    def _complete(self, sched: SchedulerOutput, handle: StepHandle) -> None:
        """Wait for a step's results and apply them: tokens, stops, logprobs, text."""
        op = self.output_processor
        result = handle.get()
        changed = self.scheduler.update_from_output(sched, result.sampled)
        for sid, (start, entries) in result.prompt_logprobs.items():
            op.add_prompt_logprobs(sid, start, entries)  # leader: sequence id == group id
        stopped = op.process_tokens(changed, result.logprobs)
        rejected: list[str] = []
        if len(self.structured_output):
            stopped, rejected = self._advance_grammars(changed, stopped)
        if stopped:
            done = self.scheduler.finish_sequences(
                [s.seq_id for s in stopped], SequenceStatus.FINISHED_STOPPED
            )
            self._finished(done)
        if rejected:
            done = self.scheduler.finish_sequences(rejected, SequenceStatus.FINISHED_ABORTED)
            self._finished(done)

    def _advance_grammars(
        self, changed: list[tuple[Sequence, list[int]]], stopped: list[Sequence]
    ) -> tuple[list[Sequence], list[str]]:
        """Feed constrained sequences their new tokens. A complete grammar stops its sequence
        (finish reason ``stop``); a token the grammar refuses (cannot happen while the mask is
        applied) aborts it. Finished sequences drop their matcher."""
        so = self.structured_output
        stopped = list(stopped)
        rejected: list[str] = []
        for seq, kept in changed:
            if seq.seq_id not in so:
                continue
            if seq.is_finished:
                so.remove_sequence(seq.seq_id)
                continue
            state = so.advance(seq.seq_id, kept)
            if state == "finished" and seq not in stopped:
                stopped.append(seq)
            elif state == "rejected":
                logger.warning("Sequence %s: its grammar refused a sampled token.", seq.seq_id)
                rejected.append(seq.seq_id)
        return stopped, rejected

    # ---- stats -------------------------------------------------------------------------
    def stats(self) -> SchedulerStats:
        """The scheduler's queues, the KV cache and their counters, now (``EngineCore`` adds
        the request, token and step counters: ``EngineStats``)."""
        sched, kv = self.scheduler, self.scheduler.kv
        return SchedulerStats(
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            kv_cache_usage=kv.usage,
            num_kv_blocks=kv.pool.num_blocks,
            num_unfinished_requests=self.get_num_unfinished_requests(),
            num_preemptions=sched.num_preemptions,
            prefix_cache_queries=kv.prefix_queries,
            prefix_cache_hits=kv.prefix_hits,
        )


def _prompt_text(prompt: PromptInput) -> str | None:
    """The request's prompt text, if it came as text (the outputs echo it)."""
    if isinstance(prompt, dict):
        text = prompt.get("prompt")
        return text if isinstance(text, str) else None
    return prompt if isinstance(prompt, str) else None
