"""Per-request bookkeeping: choices accumulated from engine outputs, and the tracker that
times a request and, when it ends, observes the latency histograms and writes its one JSON
log line (``pagedllm.requests`` logger)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagedllm.entrypoints.openai.metrics import ServerMetrics
from pagedllm.outputs import PromptLogprobs, RequestOutput, SampleLogprobs

request_logger = logging.getLogger("pagedllm.requests")


@dataclass
class ChoiceState:
    """One choice accumulated over a generation's outputs (DELTA or FINAL_ONLY)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def add(self, text: str, token_ids: list[int], logprobs: SampleLogprobs | None) -> None:
        self.text += text
        self.token_ids.extend(token_ids)
        if logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(logprobs)


@dataclass
class PromptResult:
    """Everything generated for one prompt: its choices by index, prompt logprobs, cache hits."""

    prompt_token_ids: list[int]
    prompt_logprobs: PromptLogprobs | None = None
    num_cached_tokens: int = 0
    choices: dict[int, ChoiceState] = field(default_factory=dict)

    def add(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        for c in out.outputs:
            st = self.choices.setdefault(c.index, ChoiceState())
            st.add(c.text, c.token_ids, c.logprobs)
            if c.finish_reason is not None:
                st.finish_reason, st.stop_reason = c.finish_reason, c.stop_reason


class RequestTracker:
    """Timing, token counts and the end-of-request metrics + JSON log line of one request."""

    def __init__(
        self,
        metrics: ServerMetrics,
        log_requests: bool,
        endpoint: str,
        completion_id: str,
        http_id: str,
        streamed: bool,
    ) -> None:
        self.metrics = metrics
        self.log_requests = log_requests
        self.streamed = streamed
        self.endpoint = endpoint
        self.completion_id = completion_id
        self.http_id = http_id
        self.arrival = time.monotonic()
        self.first_token: float | None = None
        self.last_token: float | None = None
        self.itls: list[float] = []
        self.prompt_tokens: dict[int, int] = {}
        self.cached_tokens: dict[int, int] = {}
        self.engine_ttft: float | None = None
        self.queue_time: float | None = None
        self.finish_reasons: dict[int, str] = {}
        self.output_tokens = 0  # generated so far (DELTA outputs), whatever the answer's fate
        self.done = False
        # Called once with the completion-token count when the request ends (rate limits).
        self.on_finish: Callable[[int], None] | None = None

    def on_output(self, prompt_index: int, out: RequestOutput, choice_base: int) -> None:
        now = time.monotonic()
        self.prompt_tokens[prompt_index] = len(out.prompt_token_ids)
        self.cached_tokens[prompt_index] = max(
            self.cached_tokens.get(prompt_index, 0), out.num_cached_tokens
        )
        new = sum(len(c.token_ids) for c in out.outputs)
        self.output_tokens += new
        if new:
            if self.first_token is None:
                self.first_token = now
            elif self.last_token is not None:
                self.itls.extend([(now - self.last_token) / new] * min(new, 64))
            self.last_token = now
        m = out.metrics
        if m is not None and m.arrival_time:
            if m.time_to_first_token is not None:
                self.engine_ttft = m.time_to_first_token
            if m.first_scheduled_time is not None:
                self.queue_time = m.first_scheduled_time - m.arrival_time
        for c in out.outputs:
            if c.finish_reason is not None:
                self.finish_reasons[choice_base + c.index] = c.finish_reason

    def finish(self, status: str, output_tokens: int, error: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        if self.on_finish is not None:
            self.on_finish(output_tokens)
        now = time.monotonic()
        ttft = self.engine_ttft
        if self.first_token is not None and (self.streamed or ttft is None):
            ttft = self.first_token - self.arrival
        reasons = [self.finish_reasons[k] for k in sorted(self.finish_reasons)]
        if status == "ok":
            self.metrics.observe_finished(
                finish_reasons=reasons,
                prompt_tokens=sum(self.prompt_tokens.values()),
                generation_tokens=output_tokens,
                ttft=ttft,
                e2e=now - self.arrival,
                queue_time=self.queue_time,
                itls=self.itls,
            )
        if not self.log_requests:
            return
        line: dict[str, Any] = {
            "event": "request_finished",
            "request_id": self.http_id,
            "id": self.completion_id,
            "endpoint": self.endpoint,
            "status": status,
            "prompt_tokens": sum(self.prompt_tokens.values()),
            "output_tokens": output_tokens,
            "cached_tokens": sum(self.cached_tokens.values()),
            "ttft_s": None if ttft is None else round(ttft, 6),
            "total_s": round(now - self.arrival, 6),
            "finish_reason": reasons[0] if len(reasons) == 1 else reasons,
        }
        if error is not None:
            line["error"] = error
        request_logger.info(json.dumps(line))


class TokenCount:
    """A mutable completion-token count shared between a chunk generator and the SSE wrapper."""

    def __init__(self) -> None:
        self.value = 0
