"""Turns per-step sequence updates into user-facing ``RequestOutput``s.

Keeps one ``RequestState`` per user request (n sequences): detokenizes new tokens, applies
stop strings, collects logprobs and prompt logprobs, and stamps timings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from pagedllm.core.scheduler_output import TokenLogprobs
from pagedllm.core.sequence import Sequence, SequenceStatus
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.outputs import (
    CompletionOutput,
    Logprob,
    PromptLogprobs,
    RequestMetrics,
    RequestOutput,
    SampleLogprobs,
)
from pagedllm.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class SequenceState:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    logprobs: SampleLogprobs | None
    cumulative_logprob: float | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_tokens: int = 0  # for DELTA outputs

    def completion(self, kind: RequestOutputKind) -> CompletionOutput:
        finished = self.finish_reason is not None
        if kind == RequestOutputKind.DELTA:
            start = self.num_sent_tokens
            self.num_sent_tokens = self.seq.num_output_tokens
            text = self.detokenizer.get_next_output_text(finished, delta=True)
            token_ids = self.seq.output_token_ids[start:]
            logprobs = self.logprobs[start:] if self.logprobs is not None else None
        else:
            text = (
                self.detokenizer.output_text
                if finished
                else self.detokenizer.get_next_output_text(False, delta=False)
            )
            token_ids = list(self.seq.output_token_ids)
            logprobs = self.logprobs
        return CompletionOutput(
            index=self.seq.index,
            text=text,
            token_ids=token_ids,
            cumulative_logprob=self.cumulative_logprob,
            logprobs=logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[SequenceState]
    prompt_logprobs: PromptLogprobs | None
    metrics: RequestMetrics
    changed: bool = False
    cached: int = field(default=0)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)

    def to_output(self) -> RequestOutput:
        kind = self.params.output_kind
        outs = [s.completion(kind) for s in self.seqs]
        if kind == RequestOutputKind.DELTA:  # only the sequences that moved
            outs = [o for o in outs if o.token_ids or o.text or o.finish_reason] or outs[:1]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs,
            outputs=outs,
            finished=self.finished,
            num_cached_tokens=max(self.seqs[0].seq.num_cached_tokens, 0),
            metrics=self.metrics,
        )


class OutputProcessor:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add_request(self, prompt: str | None, seqs: list[Sequence]) -> None:
        lead = seqs[0]
        params = lead.params
        want_lp = params.logprobs is not None
        prompt_lp: PromptLogprobs | None = None
        if params.prompt_logprobs is not None:
            prompt_lp = [None] * lead.num_prompt_tokens
        self.states[lead.request_id] = RequestState(
            request_id=lead.request_id,
            prompt=prompt,
            prompt_token_ids=lead.prompt_token_ids,
            params=params,
            seqs=[
                SequenceState(
                    s,
                    IncrementalDetokenizer(self.tokenizer, s.prompt_token_ids, s.params),
                    [] if want_lp else None,
                    0.0 if want_lp else None,
                )
                for s in seqs
            ],
            prompt_logprobs=prompt_lp,
            metrics=RequestMetrics(arrival_time=lead.arrival_time),
        )

    def _entry(self, lp: TokenLogprobs) -> dict[int, Logprob]:
        entry: dict[int, Logprob] = {}
        ranks = [lp.rank] + list(range(1, len(lp.token_ids)))
        for tok, val, rank in zip(lp.token_ids, lp.logprobs, ranks, strict=True):
            if tok not in entry:
                entry[tok] = Logprob(val, rank, self.tokenizer.decode([tok]))
        return entry

    def add_prompt_logprobs(
        self, request_id: str, start: int, entries: list[TokenLogprobs]
    ) -> None:
        state = self.states.get(request_id)
        if state is None or state.prompt_logprobs is None:
            return
        for i, lp in enumerate(entries):  # position p predicts prompt token p + 1
            state.prompt_logprobs[start + i + 1] = self._entry(lp)

    def process_tokens(
        self,
        updates: list[tuple[Sequence, list[int]]],
        logprobs: dict[str, list[TokenLogprobs]],
    ) -> list[Sequence]:
        """Detokenize each sequence's new tokens (any number). Returns sequences a stop string
        ended."""
        now = time.monotonic()
        stopped: list[Sequence] = []
        for seq, tokens in updates:
            state = self.states[seq.request_id]
            ss = state.seqs[seq.index]
            state.changed = True
            if state.metrics.first_token_time is None:
                state.metrics.first_token_time = now
            if seq.first_scheduled_time is not None and state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = seq.first_scheduled_time
            lps = logprobs.get(seq.seq_id)
            if lps is not None and ss.logprobs is not None and ss.cumulative_logprob is not None:
                for lp in lps[: len(tokens)]:
                    ss.logprobs.append(self._entry(lp))
                    ss.cumulative_logprob += lp.logprobs[0]
            stop_terminated = (
                seq.status == SequenceStatus.FINISHED_STOPPED
                and tokens[-1] in seq.params.all_stop_token_ids
            )
            matched = ss.detokenizer.update(tokens, stop_terminated)
            if matched is not None and not seq.is_finished:
                ss.stop_reason = matched
                stopped.append(seq)
            elif seq.is_finished:
                ss.finish_reason = seq.status.finish_reason
                ss.stop_reason = seq.stop_reason
        return stopped

    def finish(self, seqs: list[Sequence]) -> None:
        """Record finishes decided outside ``process_tokens`` (aborts, stop strings)."""
        for seq in seqs:
            state = self.states.get(seq.request_id)
            if state is None:
                continue
            ss = state.seqs[seq.index]
            ss.finish_reason = seq.status.finish_reason
            if seq.status != SequenceStatus.FINISHED_STOPPED:
                ss.stop_reason = None
            state.changed = True

    def collect(self) -> list[RequestOutput]:
        """Outputs of every request that changed this step; finished ones are dropped."""
        outs: list[RequestOutput] = []
        now = time.monotonic()
        for rid in [rid for rid, s in self.states.items() if s.changed]:
            state = self.states[rid]
            state.changed = False
            if state.finished:
                state.metrics.finished_time = now
                del self.states[rid]
            elif state.params.output_kind == RequestOutputKind.FINAL_ONLY:
                continue
            outs.append(state.to_output())
        return outs
