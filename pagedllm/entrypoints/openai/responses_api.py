"""``POST /v1/responses``: OpenAI's Responses API (text in; text, or streamed events, out).

New OpenAI SDK code and agent frameworks call ``client.responses.create`` rather than chat
completions. A Responses request is a chat in another shape (``instructions`` is the system
message, ``input`` the conversation, ``max_output_tokens`` the token limit), so this module
translates it into a ``ChatCompletionRequest`` and lets ``ChatServing`` do everything that
matters — validation, templating, limits, accounting, metrics, disconnects — then reshapes the
answer: one ``response`` object, or, with ``stream``, the Responses event sequence
(``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta`` ..., for a function call its
``response.function_call_arguments.delta`` events, the matching ``.done`` events and
``response.completed``; ``response.incomplete`` when ``max_output_tokens`` cut it).

Supported: ``input`` as text or a list of messages (text content or ``input_text`` /
``output_text`` parts), ``instructions``, ``max_output_tokens``, ``temperature``, ``top_p``,
``text.format`` (``text`` or ``json_schema``, the latter enforced as structured output),
``stream``, function ``tools`` with ``tool_choice`` and ``parallel_tool_calls`` (calls come
back as ``function_call`` output items, streamed or not, and ``function_call`` /
``function_call_output`` input items carry a tool round trip), and bookkeeping fields.
``previous_response_id`` (nothing is stored), ``reasoning`` and the other fields are answered
400 naming the field.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pagedllm.entrypoints.openai.errors import bad_request
from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest
from pagedllm.entrypoints.openai.responses_stream import (
    response_object,
    stream_events,
    usage_object,
)
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


class FunctionCallItem(BaseModel):
    """An earlier call of the model's, given back in ``input``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(BaseModel):
    """A tool's result for ``call_id``, given in ``input``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function_call_output"]
    call_id: str
    output: str
    id: str | None = None
    status: str | None = None


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


InputItem = InputMessage | FunctionCallItem | FunctionCallOutputItem


class ResponsesRequest(BaseModel):
    """The fields of a Responses request that pagedllm reads (others are checked by name)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    model: str | None = None
    input: str | list[InputItem]
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
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


def _chat_messages(items: list[InputItem]) -> list[dict[str, Any]]:
    """Input items as chat messages: consecutive function calls form one assistant message
    with ``tool_calls``; a call's output is a ``tool`` message."""
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, InputMessage):
            out.append({"role": item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
    return out


def _chat_tools(req: ResponsesRequest) -> dict[str, Any]:
    """``tools`` / ``tool_choice`` / ``parallel_tool_calls`` in chat completions' shape."""
    body: dict[str, Any] = {}
    if req.tools:
        body["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
            for t in req.tools
        ]
    choice = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise bad_request("tool_choice must name a function tool.", "tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None and (req.tools or choice == "none"):
        body["tool_choice"] = choice
    elif choice not in (None, "auto"):
        raise bad_request("tool_choice needs tools.", "tool_choice")
    if req.parallel_tool_calls is not None and req.tools:
        body["parallel_tool_calls"] = req.parallel_tool_calls
    return body


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
        messages += _chat_messages(req.input)
    if not messages:
        raise bad_request("input must hold at least one message.", "input")
    body: dict[str, Any] = {"model": req.model, "messages": messages, "stream": req.stream}
    body.update(_chat_tools(req))
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
            usage = usage_object(data.get("usage"))
            calls = choice["message"].get("tool_calls")
            obj = response_object(rid, data["model"], created, text, status, usage, calls)
            return Response(json.dumps(obj), media_type="application/json")
        events = stream_events(answer.body_iterator, rid, created)
        return StreamingResponse(events, media_type="text/event-stream")
