"""``POST /v1/chat/completions``: chat completions in OpenAI's shape.

Messages (system / developer / user / assistant / tool; string or text-part content) are
rendered with the model's chat template (or ``--chat-template``) and tokenized. Streaming sends
a ``role`` chunk per choice, then content deltas, then a ``finish_reason`` chunk per choice,
an optional usage chunk and ``data: [DONE]``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from pagedllm.engine.tokenizer import apply_chat_template
from pagedllm.entrypoints.openai.accounting import PromptResult, RequestTracker, TokenCount
from pagedllm.entrypoints.openai.errors import bad_request
from pagedllm.entrypoints.openai.logprobs import chat_logprobs
from pagedllm.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatStreamChoice,
    PromptTokensDetails,
    UsageInfo,
)
from pagedllm.entrypoints.openai.server_state import (
    MAX_LOGPROBS,
    check_unicode,
    random_id,
    rate_subject,
)
from pagedllm.entrypoints.openai.serving_base import OpenAIServing
from pagedllm.entrypoints.openai.streaming import StreamOptionsMixin
from pagedllm.outputs import RequestOutput

_TEXT_PART_TYPES = ("text", "input_text")


def content_chars(messages: list[ChatMessage]) -> int:
    """Characters of text in ``messages`` (the template only adds to them)."""
    total = 0
    for m in messages:
        if isinstance(m.content, str):
            total += len(m.content)
        elif m.content is not None:
            total += sum(len(p.text or "") for p in m.content)
    return total


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Request messages as chat-template dicts (text parts joined, ``developer`` -> system)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            texts: list[str] = []
            for part in m.content:
                if part.type not in _TEXT_PART_TYPES or part.text is None:
                    raise bad_request(
                        f"messages[{i}]: unsupported content part type {part.type!r}; only "
                        "text parts are supported.",
                        "messages",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        else:
            content = m.content or ""
        check_unicode(content, "messages")
        if m.name is not None:
            check_unicode(m.name, "messages")
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        d["content"] = content
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            d["tool_calls"] = m.tool_calls
        out.append(d)
    return out


class ChatServing(OpenAIServing):
    """Handles ``/v1/chat/completions``."""

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool) -> list[int]:
        """Chat-template token ids of ``messages``; template problems are 400s."""
        conv = template_messages(messages)
        try:
            return apply_chat_template(
                self.tokenizer, conv, add_generation_prompt, self.state.chat_template
            )
        except Exception as e:  # jinja errors, raise_exception() in templates, no template
            raise bad_request(f"Cannot apply the chat template: {e}", "messages") from e

    async def render_checked(
        self, messages: list[ChatMessage], add_generation_prompt: bool
    ) -> list[int]:
        """``render`` in the tokenizer pool, after the instant too-long check."""
        self.state.check_text_fits(content_chars(messages), "messages")
        return await self.off_loop(self.render, messages, add_generation_prompt)

    async def create(self, req: ChatCompletionRequest, raw: Request, http_id: str) -> Response:
        model = self.model_name(req.model)
        constraint = self.check_common(req)
        self.check_fan_out(1, req.n)
        if req.top_logprobs is not None:
            if req.top_logprobs > MAX_LOGPROBS:
                raise bad_request(f"top_logprobs must be at most {MAX_LOGPROBS}.", "top_logprobs")
            if not req.logprobs:
                raise bad_request("top_logprobs requires logprobs=true.", "top_logprobs")
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is not None and max_tokens < 1:
            raise bad_request("max_tokens must be at least 1.", "max_tokens")
        prompt_ids = await self.render_checked(req.messages, req.add_generation_prompt)
        params = self.sampling_params(
            req,
            max_tokens=max_tokens,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            prompt_logprobs=None,
            stream=req.stream,
            constraint=constraint,
        )
        self.check_prompt(prompt_ids, params, max_tokens, "messages")
        ctx = _ChatCtx(self, req, model, len(prompt_ids))
        ctx.tracker = self.tracker("chat.completions", ctx.id, http_id, req.stream)
        self.track_usage(ctx.tracker, rate_subject(raw), len(prompt_ids))
        stream = self.merged_generate([prompt_ids], params, ctx.id, req.priority, constraint)
        return await self.respond(
            raw, ctx.tracker, stream, req.n, ctx.chunks if req.stream else None, ctx.final
        )


class _ChatCtx(StreamOptionsMixin):
    """Per-request formatting state."""

    def __init__(
        self, serving: ChatServing, req: ChatCompletionRequest, model: str, prompt_len: int
    ) -> None:
        self.s = serving
        self.req = req
        self.model = model
        self.prompt_len = prompt_len
        self.id = random_id("chatcmpl")
        self.created = int(time.time())
        self.k = req.top_logprobs or 0
        self.tracker: RequestTracker

    def _logprobs(self, token_ids: list[int], entries: Any) -> ChatLogprobs | None:
        if not self.req.logprobs:
            return None
        return chat_logprobs(self.s.tokenizer, self.s.token_bytes, token_ids, entries, self.k)

    def _usage(self, completion_tokens: int, cached: int) -> UsageInfo:
        return UsageInfo(
            prompt_tokens=self.prompt_len,
            completion_tokens=completion_tokens,
            total_tokens=self.prompt_len + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )

    def final(self, results: dict[int, PromptResult]) -> ChatCompletionResponse:
        r = results.get(0) or PromptResult([])
        choices = []
        for j in sorted(r.choices):
            st = r.choices[j]
            choices.append(
                ChatChoice(
                    index=j,
                    message=AssistantMessage(content=st.text),
                    logprobs=self._logprobs(st.token_ids, st.logprobs),
                    finish_reason=st.finish_reason,
                    stop_reason=st.stop_reason,
                )
            )
        completion_tokens = sum(len(st.token_ids) for st in r.choices.values())
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=self._usage(completion_tokens, r.num_cached_tokens),
        )

    def _chunk(self, choice: ChatStreamChoice, usage: UsageInfo | None = None) -> str:
        return self._stream_chunk(ChatCompletionChunk, choice, usage)

    async def chunks(
        self, items: AsyncIterator[tuple[int, RequestOutput]], count: TokenCount
    ) -> AsyncIterator[str]:
        for j in range(self.req.n):
            yield self._chunk(ChatStreamChoice(index=j, delta={"role": "assistant", "content": ""}))
        cached = 0
        async for _, out in items:
            self.tracker.on_output(0, out, 0)
            cached = max(cached, out.num_cached_tokens)
            for c in out.outputs:
                ids = list(c.token_ids)
                count.value += len(ids)
                usage = self._usage(count.value, cached) if self._continuous_usage else None
                lp = self._logprobs(ids, c.logprobs) if ids else None
                if c.text or ids:  # every step with new tokens streams a chunk, as vLLM
                    delta = {"content": c.text}
                    choice = ChatStreamChoice(index=c.index, delta=delta, logprobs=lp)
                    yield self._chunk(choice, usage)
                if c.finish_reason is not None:
                    choice = ChatStreamChoice(
                        index=c.index,
                        delta={},
                        finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason,
                    )
                    yield self._chunk(choice, usage)
        if self._include_usage:
            chunk = ChatCompletionChunk(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=[],
                usage=self._usage(count.value, cached),
            )
            yield chunk.model_dump_json()
