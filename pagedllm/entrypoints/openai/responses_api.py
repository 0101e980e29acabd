"""``POST /v1/responses``: OpenAI's Responses API (text in; text, or streamed events, out).

New OpenAI SDK code and agent frameworks call ``client.responses.create`` rather than chat
completions. A Responses request is a chat in another shape (``instructions`` is the system
message, ``input`` the conversation, ``max_output_tokens`` the token limit), so this module
translates it into a ``ChatCompletionRequest`` and lets ``ChatServing`` do everything that
matters — validation, templating, limits, accounting, metrics, disconnects — then reshapes the
answer: one ``response`` object, or, with ``stream``, the Responses event sequence
(``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta`` ..., the matching ``.done``
events and ``response.completed``; ``response.incomplete`` when ``max_output_tokens`` cut it).

Supported: ``input`` as text or a list of messages (text content or ``input_text`` /
``output_text`` parts), ``instructions``, ``max_output_tokens``, ``temperature``, ``top_p``,
``text.format`` (``text`` or ``json_schema``, the latter enforced as structured output),
``stream``, and bookkeeping fields. Tools, ``previous_response_id`` (nothing is stored),
``reasoning`` and the other fields are answered 400 naming the field.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pagedllm.entrypoints.openai.errors import bad_request
from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest
from pagedllm.entrypoints.openai.serving_chat import ChatServing

_BOOKKEEPING = {
    "metadata",
    "store",
    "user",
    "service_tier",
    "safety_identifier",
    "prompt_cache_key",
}
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "previous_response_id": (None,),
    "reasoning": (None,),
    "include": (None, []),
    "truncation": (None, "disabled"),
    "background": (None, False),
    "top_logprobs": (None, 0),
}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["input_text", "output_text", "text"]
    text: str
    annotations: list[Any] | None = None


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class ResponsesRequest(BaseModel):
    """The fields of a Responses request that pagedllm reads (others are checked by name)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    model: str | None = None
    input: str | list[InputMessage]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    text: dict[str, Any] | None = None


def _check_fields(req: ResponsesRequest) -> None:
    for name, value in (req.model_extra or {}).items():
        if name in _BOOKKEEPING:
            continue
        if name in _OFF_VALUES and value in _OFF_VALUES[name]:
            continue
        raise bad_request(f"The field {name!r} is not supported on /v1/responses.", name)


def _text(content: str | list[ContentPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    fmt = (text or {}).get("format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise bad_request(f"text.format type {fmt.get('type')!r} is not supported.", "text.format")


def to_chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that answers ``req`` (400 for what cannot be expressed)."""
    _check_fields(req)
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
    else:
        messages += [{"role": m.role, "content": _text(m.content)} for m in req.input]
    if not messages:
        raise bad_request("input must hold at least one message.", "input")
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": req.stream}
    for src, dst in (("max_output_tokens", "max_tokens"), ("temperature", "temperature")):
        if getattr(req, src) is not None:
            body[dst] = getattr(req, src)
    if req.top_p is not None:
        body["top_p"] = req.top_p
    fmt = _response_format(req.text)
    if fmt is not None:
        body["response_format"] = fmt
    if req.stream:
        body["stream_options"] = {"include_usage": True}
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"]))
        raise bad_request(f"{where}: {err['msg']}", "input") from None


def _response(rid: str, model: str, created: int, text: str, status: str, usage: Any) -> dict:
    done = status != "in_progress"
    message = {
        "type": "message",
        "id": "msg_" + rid[5:],
        "status": "completed" if done else "in_progress",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}] if done else [],
    }
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "model": model,
        "output": [message] if done else [],
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "error": None,
        "usage": usage,
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
    }


def _usage(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    if not chat_usage:
        return None
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": cached or 0},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat_usage["prompt_tokens"] + chat_usage["completion_tokens"],
    }


class ResponseObject(BaseModel):
    """The documented shape of a ``response`` (what clients read of it)."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete"]
    model: str
    output: list[dict[str, Any]]
    usage: dict[str, Any] | None


def install_responses_route(app: FastAPI, chat: ChatServing, require_engine: Any) -> None:
    from pagedllm.entrypoints.openai.openapi import generation_responses

    docs = generation_responses(ResponseObject)

    @app.post("/v1/responses", response_model=None, responses=docs)
    async def responses(body: ResponsesRequest, raw: Request) -> Response:
        require_engine()
        chat_req = to_chat_request(body)
        answer = await chat.create(chat_req, raw, raw.state.request_id)
        rid = "resp_" + uuid.uuid4().hex
        created = int(time.time())
        if answer.status_code != 200:
            return answer
        if not isinstance(answer, StreamingResponse):
            data = json.loads(bytes(answer.body))
            choice = data["choices"][0]
            status = "incomplete" if choice["finish_reason"] == "length" else "completed"
            text = choice["message"]["content"] or ""
            obj = _response(rid, data["model"], created, text, status, _usage(data.get("usage")))
            return Response(json.dumps(obj), media_type="application/json")
        events = _stream_events(answer.body_iterator, rid, created)
        return StreamingResponse(events, media_type="text/event-stream")


async def _stream_events(chunks: AsyncIterator[Any], rid: str, created: int) -> AsyncIterator[str]:
    seq = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        seq += 1
        data = json.dumps({"type": kind, "sequence_number": seq - 1, **fields})
        return f"event: {kind}\ndata: {data}\n\n"

    model, text, finish, usage = "", [], None, None
    msg_id = "msg_" + rid[5:]
    started = False
    try:
        async for raw_chunk in chunks:
            piece = raw_chunk.decode() if isinstance(raw_chunk, bytes) else str(raw_chunk)
            for line in piece.splitlines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    yield event(
                        "error",
                        code=chunk["error"].get("code"),
                        message=chunk["error"]["message"],
                        param=chunk["error"].get("param"),
                    )
                    return
                model = chunk.get("model", model)
                if not started:
                    started = True
                    head = _response(rid, model, created, "", "in_progress", None)
                    yield event("response.created", response=head)
                    yield event("response.in_progress", response=head)
                    item = {
                        "type": "message",
                        "id": msg_id,
                        "status": "in_progress",
                        "role": "assistant",
                        "content": [],
                    }
                    yield event("response.output_item.added", output_index=0, item=item)
                    part = {"type": "output_text", "text": "", "annotations": []}
                    yield event(
                        "response.content_part.added",
                        item_id=msg_id,
                        output_index=0,
                        content_index=0,
                        part=part,
                    )
                if chunk.get("usage"):
                    usage = _usage(chunk["usage"])
                for choice in chunk.get("choices", []):
                    delta = (choice.get("delta") or {}).get("content")
                    if delta:
                        text.append(delta)
                        yield event(
                            "response.output_text.delta",
                            item_id=msg_id,
                            output_index=0,
                            content_index=0,
                            delta=delta,
                            logprobs=[],
                        )
                    finish = choice.get("finish_reason") or finish
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()  # a client gone mid-stream: the chat stream aborts the request
    full = "".join(text)
    yield event(
        "response.output_text.done",
        item_id=msg_id,
        output_index=0,
        content_index=0,
        text=full,
        logprobs=[],
    )
    part = {"type": "output_text", "text": full, "annotations": []}
    yield event(
        "response.content_part.done", item_id=msg_id, output_index=0, content_index=0, part=part
    )
    status = "incomplete" if finish == "length" else "completed"
    final = _response(rid, model, created, full, status, usage)
    yield event("response.output_item.done", output_index=0, item=final["output"][0])
    yield event(
        "response.incomplete" if status == "incomplete" else "response.completed", response=final
    )
