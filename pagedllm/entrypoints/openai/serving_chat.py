"""``POST /v1/chat/completions``: chat completions in OpenAI's shape.

Messages (system / developer / user / assistant / tool; string or text-part content; assistant
``tool_calls``) and ``tools`` are rendered with the model's chat template (or
``--chat-template``; ``chat_render.py``) and tokenized. ``tool_calls.py`` decides how the
output becomes tool calls. Streaming sends a ``role`` chunk per choice, then content (and
tool-call) deltas, then a ``finish_reason`` chunk per choice, an optional usage chunk and
``data: [DONE]``.

``image_url`` parts (models that take images): the images are decoded, checked and processed
in the tokenizer pool by the engine's own input processor (a bad image is a 400 naming it),
and travel to the engine as processed features with the expanded prompt.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from pagedllm.engine.messages import AddRequest
from pagedllm.entrypoints.openai.accounting import PromptResult, RequestTracker, TokenCount
from pagedllm.entrypoints.openai.chat_render import (
    content_chars,
    image_urls,
    render_chat,
    template_messages,
)
from pagedllm.entrypoints.openai.errors import bad_request
from pagedllm.entrypoints.openai.logprobs import chat_logprobs
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    ChatMessage,
)
from pagedllm.entrypoints.openai.protocol_responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    FunctionCallOut,
    PromptTokensDetails,
    ToolCallOut,
    UsageInfo,
)
from pagedllm.entrypoints.openai.server_state import random_id, rate_subject
from pagedllm.entrypoints.openai.serving_base import OpenAIServing
from pagedllm.entrypoints.openai.streaming import StreamOptionsMixin
from pagedllm.entrypoints.openai.tool_calls import ToolPlan, delta_dicts, plan_tools
from pagedllm.entrypoints.openai.tool_parsers import ToolCallStreamer
from pagedllm.outputs import RequestOutput


class ChatServing(OpenAIServing):
    """Handles ``/v1/chat/completions``."""

    def render(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Chat-template token ids of ``messages`` (and ``tools``); template problems are 400s."""
        conv = template_messages(messages, images_allowed=self.processor.images is not None)
        try:
            return render_chat(
                self.tokenizer, conv, add_generation_prompt, self.state.chat_template, tools
            )
        except Exception as e:  # jinja errors, raise_exception() in templates, no template
            raise bad_request(f"Cannot apply the chat template: {e}", "messages") from e

    async def render_checked(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """``render`` in the tokenizer pool, after the instant too-long check."""
        self.state.check_text_fits(content_chars(messages, tools), "messages")
        return await self.off_loop(self.render, messages, add_generation_prompt, tools)

    def with_images(self, prompt_ids: list[int], urls: list[str]) -> tuple[list[int], Any]:
        """(expanded prompt ids, the engine prompt with processed images) of a prompt whose
        template placed ``urls``; a bad image is a 400 naming it."""
        try:
            ids, features = self.processor.tokenize_multimodal(
                {"prompt_token_ids": prompt_ids, "multi_modal_data": {"image": urls}}
            )
        except ValueError as e:
            raise bad_request(str(e), "messages") from e
        if "mm_features" not in AddRequest.__dataclass_fields__:
            raise bad_request(
                "Image inputs are not supported through the server yet (the engine protocol "
                "does not carry them); use the offline LLM API.",
                "messages",
            )
        return ids, {"prompt_token_ids": ids, "mm_features": features}

    async def create(self, req: ChatCompletionRequest, raw: Request, http_id: str) -> Response:
        model = self.model_name(req.model)
        constraint = self.check_common(req)
        plan = plan_tools(req, constraint, self.state)
        if plan.constraint is not None:
            constraint = plan.constraint
        self.check_fan_out(1, req.n)
        if req.top_logprobs is not None:
            limit = self.state.logprobs_limit
            if req.top_logprobs > limit:
                raise bad_request(f"top_logprobs must be at most {limit}.", "top_logprobs")
            if not req.logprobs:
                raise bad_request("top_logprobs requires logprobs=true.", "top_logprobs")
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is not None and max_tokens < 1:
            raise bad_request("max_tokens must be at least 1.", "max_tokens")
        prompt_ids = await self.render_checked(req.messages, req.add_generation_prompt, plan.tools)
        params = self.sampling_params(
            req,
            max_tokens=max_tokens,
            logprobs=(req.top_logprobs or 0) if req.logprobs else None,
            prompt_logprobs=None,
            stream=req.stream,
            constraint=constraint,
        )
        prompt: Any = prompt_ids
        urls = image_urls(req.messages)
        if urls:
            prompt_ids, prompt = await self.off_loop(self.with_images, prompt_ids, urls)
        self.check_prompt(prompt_ids, params, max_tokens, "messages")
        ctx = _ChatCtx(self, req, model, len(prompt_ids), plan)
        ctx.tracker = self.tracker("chat.completions", ctx.id, http_id, req.stream)
        self.track_usage(ctx.tracker, rate_subject(raw), len(prompt_ids))
        stream = self.merged_generate([prompt], params, ctx.id, req.priority, constraint)
        return await self.respond(
            raw, ctx.tracker, stream, req.n, ctx.chunks if req.stream else None, ctx.final
        )


class _ChatCtx(StreamOptionsMixin):
    """Per-request formatting state."""

    def __init__(
        self,
        serving: ChatServing,
        req: ChatCompletionRequest,
        model: str,
        prompt_len: int,
        plan: ToolPlan,
    ) -> None:
        self.s = serving
        self.plan = plan
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
            content, calls = self.plan.parse(st.text)
            tool_calls = [
                ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments))
                for c in calls
            ]
            choices.append(
                ChatChoice(
                    index=j,
                    message=AssistantMessage(content=content, tool_calls=tool_calls),
                    logprobs=self._logprobs(st.token_ids, st.logprobs),
                    finish_reason=self.plan.finish_reason(st.finish_reason, bool(calls)),
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
        role = {"role": "assistant", "content": None if self.plan.forced else ""}
        for j in range(self.req.n):
            yield self._chunk(ChatStreamChoice(index=j, delta=dict(role)))
        cached = 0
        streamers: dict[int, ToolCallStreamer | None] = {}
        called: set[int] = set()  # choices that sent a tool call
        async for _, out in items:
            self.tracker.on_output(0, out, 0)
            cached = max(cached, out.num_cached_tokens)
            for c in out.outputs:
                ids = list(c.token_ids)
                count.value += len(ids)
                usage = self._usage(count.value, cached) if self._continuous_usage else None
                lp = self._logprobs(ids, c.logprobs) if ids else None
                if c.index not in streamers:
                    streamers[c.index] = self.plan.streamer()
                streamer = streamers[c.index]
                if streamer is None:
                    deltas = [{"content": c.text}] if c.text or ids else []  # as vLLM
                else:
                    msg = streamer.feed(c.text)
                    if c.finish_reason is not None:
                        msg.extend(streamer.finish())
                    deltas = delta_dicts(msg, self.plan.parallel)
                    if any("tool_calls" in d for d in deltas):
                        called.add(c.index)
                    if not deltas and lp is not None:
                        deltas = [{}]  # the step's logprobs still go out
                for k, delta in enumerate(deltas):
                    choice = ChatStreamChoice(
                        index=c.index, delta=delta, logprobs=lp if k == 0 else None
                    )
                    yield self._chunk(choice, usage)
                if c.finish_reason is not None:
                    choice = ChatStreamChoice(
                        index=c.index,
                        delta={},
                        finish_reason=self.plan.finish_reason(c.finish_reason, c.index in called),
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
