"""``POST /v1/completions``: text completions in OpenAI's (legacy) shape.

``prompt`` may be a string, a list of strings, a token-id list or a list of token-id lists;
each prompt runs as its own engine request and choice ``i * n + j`` is completion ``j`` of
prompt ``i``. ``echo`` prepends the prompt (and, with ``logprobs``, its prompt logprobs);
``max_tokens=0`` with ``echo`` scores a prompt without generating (lm-eval style).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response

from pagedllm.entrypoints.openai.accounting import (
    ChoiceState,
    PromptResult,
    RequestTracker,
    TokenCount,
)
from pagedllm.entrypoints.openai.errors import bad_request
from pagedllm.entrypoints.openai.logprobs import append_legacy_logprobs
from pagedllm.entrypoints.openai.protocol import CompletionRequest
from pagedllm.entrypoints.openai.protocol_responses import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    PromptTokensDetails,
    UsageInfo,
)
from pagedllm.entrypoints.openai.server_state import (
    MAX_PROMPTS,
    check_unicode,
    random_id,
    rate_subject,
)
from pagedllm.entrypoints.openai.serving_base import OpenAIServing
from pagedllm.entrypoints.openai.streaming import StreamOptionsMixin
from pagedllm.outputs import Logprob, RequestOutput

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class CompletionServing(OpenAIServing):
    """Handles ``/v1/completions``."""

    def _prompts(
        self, prompt: str | list[int] | list[str] | list[list[int]]
    ) -> list[str | list[int]]:
        """The request's prompts, each a string or token ids; too-long text is a 400 here."""
        raw: list[str | list[int]]
        if isinstance(prompt, str):
            raw = [prompt]
        elif prompt and all(isinstance(t, int) for t in prompt):
            raw = [list(prompt)]  # type: ignore[arg-type]
        else:
            raw = list(prompt)  # type: ignore[arg-type]
        if not raw:
            raise bad_request("prompt must not be empty.", "prompt")
        if len(raw) > MAX_PROMPTS:
            raise bad_request(f"At most {MAX_PROMPTS} prompts per request.", "prompt")
        for p in raw:
            if isinstance(p, str):
                self.state.check_text_fits(len(p), "prompt")
        return raw

    def _tokenize(self, raw: list[str | list[int]]) -> list[list[int]]:
        """Token ids of every prompt (runs in the tokenizer pool; ``check_prompt`` checks them)."""
        out: list[list[int]] = []
        for p in raw:
            if isinstance(p, str):
                check_unicode(p, "prompt")
            out.append(self.processor.tokenize(p))
        return out

    def _prompt_text(self, prompt: str | list[int] | list[str] | list[list[int]], i: int) -> str:
        if isinstance(prompt, str):
            return prompt
        item = prompt[i] if isinstance(prompt[0], (str, list)) else prompt
        if isinstance(item, str):
            return item
        return str(self.tokenizer.decode(item))

    async def create(self, req: CompletionRequest, raw: Request, http_id: str) -> Response:
        model = self.model_name(req.model)
        constraint = self.check_common(req)
        if req.suffix:
            raise bad_request("suffix is not supported.", "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of is not supported (it must be unset or equal n).", "best_of")
        limit = self.state.logprobs_limit
        if req.logprobs is not None and req.logprobs > limit:
            raise bad_request(f"logprobs must be at most {limit}.", "logprobs")
        raw_prompts = self._prompts(req.prompt)
        self.check_fan_out(len(raw_prompts), req.n)
        prompts = await self.off_loop(self._tokenize, raw_prompts)
        max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        echo_lp = req.logprobs if req.echo else None
        params = self.sampling_params(
            req,
            max_tokens=max(max_tokens, 1),
            logprobs=req.logprobs,
            prompt_logprobs=echo_lp,
            stream=req.stream,
            constraint=constraint,
        )
        for ids in prompts:
            self.check_prompt(ids, params, max_tokens, "prompt")
        ctx = _Ctx(self, req, model, prompts, scoring_only=max_tokens == 0)
        ctx.tracker = self.tracker("completions", ctx.id, http_id, req.stream)
        self.track_usage(ctx.tracker, rate_subject(raw), sum(len(p) for p in prompts))
        stream = self.merged_generate(prompts, params, ctx.id, req.priority, constraint)
        return await self.respond(
            raw, ctx.tracker, stream, req.n, ctx.chunks if req.stream else None, ctx.final
        )


class _Ctx(StreamOptionsMixin):
    """Per-request formatting state (ids, echo prefixes, streaming offsets)."""

    def __init__(
        self,
        serving: CompletionServing,
        req: CompletionRequest,
        model: str,
        prompts: list[list[int]],
        scoring_only: bool,
    ) -> None:
        self.s = serving
        self.req = req
        self.model = model
        self.prompts = prompts
        self.scoring_only = scoring_only
        self.id = random_id("cmpl")
        self.created = int(time.time())
        self.offsets: dict[int, int] = {}  # choice index -> next text offset (streaming)
        self.tracker: RequestTracker

    def _echo(
        self, i: int, prompt_lps: list[dict[int, Logprob] | None] | None
    ) -> tuple[str, CompletionLogprobs | None, int]:
        """The echoed prompt text, its logprobs and the offset after it."""
        text = self.s._prompt_text(self.req.prompt, i) if self.req.echo else ""
        k = self.req.logprobs
        if k is None:
            return text, None, len(text)
        lp = CompletionLogprobs()
        offset = 0
        if self.req.echo:  # offsets follow the token strings (special tokens included)
            ids = self.prompts[i]
            entries = list(prompt_lps) if prompt_lps is not None else [None] * len(ids)
            offset = append_legacy_logprobs(lp, self.s.tokenizer, ids, entries, k, 0)
        return text, lp, offset

    def _completion(self, st: ChoiceState) -> tuple[str, list[int], list[dict[int, Logprob]]]:
        if self.scoring_only:
            return "", [], []
        return st.text, st.token_ids, st.logprobs or []

    def final(self, results: dict[int, PromptResult]) -> CompletionResponse:
        n = self.req.n
        choices: list[CompletionChoice] = []
        completion_tokens = 0
        for i in sorted(results):
            r = results[i]
            for j in sorted(r.choices):
                st = r.choices[j]
                prefix, lp, offset = self._echo(i, r.prompt_logprobs)
                text, ids, entries = self._completion(st)
                completion_tokens += len(ids)
                if lp is not None and self.req.logprobs is not None:
                    append_legacy_logprobs(
                        lp, self.s.tokenizer, ids, list(entries), self.req.logprobs, offset
                    )
                choices.append(
                    CompletionChoice(
                        index=i * n + j,
                        text=prefix + text,
                        logprobs=lp,
                        finish_reason=st.finish_reason,
                        stop_reason=st.stop_reason,
                    )
                )
        return CompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self._usage(results, completion_tokens),
        )

    def _usage(self, results: dict[int, PromptResult], completion_tokens: int) -> UsageInfo:
        prompt_tokens = sum(len(p) for p in self.prompts)
        cached = sum(r.num_cached_tokens for r in results.values())
        return UsageInfo(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    def _chunk(self, choice: CompletionChoice, usage: UsageInfo | None = None) -> str:
        return self._stream_chunk(CompletionChunk, choice, usage)

    async def chunks(
        self, items: AsyncIterator[tuple[int, RequestOutput]], count: TokenCount
    ) -> AsyncIterator[str]:
        n, k = self.req.n, self.req.logprobs
        tracker_results: dict[int, PromptResult] = {}
        async for i, out in items:
            self.tracker.on_output(i, out, i * n)
            r = tracker_results.setdefault(i, PromptResult(list(out.prompt_token_ids)))
            r.num_cached_tokens = max(r.num_cached_tokens, out.num_cached_tokens)
            for c in out.outputs:
                idx = i * n + c.index
                text, ids = ("", []) if self.scoring_only else (c.text, list(c.token_ids))
                lp: CompletionLogprobs | None = None
                if idx not in self.offsets:  # first chunk of this choice: echo the prompt
                    prefix, lp, self.offsets[idx] = self._echo(i, out.prompt_logprobs)
                    text = prefix + text
                elif k is not None:
                    lp = CompletionLogprobs()
                if lp is not None and k is not None and ids:
                    entries = list(c.logprobs or [])
                    self.offsets[idx] = append_legacy_logprobs(
                        lp, self.s.tokenizer, ids, entries, k, self.offsets[idx]
                    )
                count.value += len(ids)
                usage = None
                if self._continuous_usage:
                    usage = self._usage(tracker_results, count.value)
                if text or ids or (lp is not None and lp.tokens):  # token progress, as vLLM
                    yield self._chunk(CompletionChoice(index=idx, text=text, logprobs=lp), usage)
                if c.finish_reason is not None:
                    choice = CompletionChoice(
                        index=idx, text="", finish_reason=c.finish_reason, stop_reason=c.stop_reason
                    )
                    yield self._chunk(choice, usage)
        if self._include_usage:
            usage = self._usage(tracker_results, count.value)
            chunk = CompletionChunk(
                id=self.id, created=self.created, model=self.model, choices=[], usage=usage
            )
            yield chunk.model_dump_json()
