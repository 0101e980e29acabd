"""The shapes of ``/v1/responses``: the ``response`` object, its usage, and its streamed form
(chat completion chunks in, Responses events out).

``responses_api.py`` runs a streamed request as a streamed chat completion; this turns its SSE
chunks into the Responses event sequence clients expect, numbered by ``sequence_number``:
``response.created`` and ``response.in_progress`` (with the response still empty),
``response.output_item.added`` (and ``response.content_part.added``) as each output item
starts (the message on its first text, a ``function_call`` on its first tool-call delta), a
``response.output_text.delta`` per text piece and a ``response.function_call_arguments.delta``
per arguments piece, then each item's ``.done`` events in output order and
``response.completed`` (or ``response.incomplete`` when ``max_output_tokens`` cut the
answer). An error chunk becomes an
``error`` event. Closing this stream (the client went away) closes the chat stream, which
aborts the request in the engine.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any


def function_call_item(call: dict[str, Any], status: str) -> dict[str, Any]:
    """A chat-shaped tool call (``id``, ``function.name``, ``function.arguments``) as a
    Responses ``function_call`` output item; its item id follows from the call id, so the
    streamed item and the final response's agree."""
    call_id = call["id"]
    return {
        "type": "function_call",
        "id": "fc_" + call_id.removeprefix("call_"),
        "call_id": call_id,
        "name": call["function"]["name"],
        "arguments": call["function"]["arguments"],
        "status": status,
    }


def response_object(
    rid: str,
    model: str,
    created: int,
    text: str,
    status: str,
    usage: Any,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    done = status != "in_progress"
    message = {
        "type": "message",
        "id": "msg_" + rid[5:],
        "status": "completed" if done else "in_progress",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}] if done else [],
    }
    calls = [function_call_item(c, "completed") for c in tool_calls or []]
    output = ([message] if text or not calls else []) + calls if done else []
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "model": model,
        "output": output,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "error": None,
        "usage": usage,
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
    }


def usage_object(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
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


class _StreamedOutput:
    """The output items of one streamed response, opened as their first delta arrives: the
    message on its first text, a function call on the first delta of its chat tool-call
    index. Each event is numbered by ``event``."""

    def __init__(self, rid: str, event: Any) -> None:
        self.msg_id = "msg_" + rid[5:]
        self.event = event
        self.order: list[Any] = []  # "message" or a tool-call index, in output order
        self.text: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> chat-shaped call

    def _index(self, key: Any) -> int:
        return self.order.index(key)

    def open_message(self) -> list[str]:
        if "message" in self.order:
            return []
        self.order.append("message")
        i = self._index("message")
        item = {
            "type": "message",
            "id": self.msg_id,
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        part = {"type": "output_text", "text": "", "annotations": []}
        return [
            self.event("response.output_item.added", output_index=i, item=item),
            self.event(
                "response.content_part.added",
                item_id=self.msg_id,
                output_index=i,
                content_index=0,
                part=part,
            ),
        ]

    def text_delta(self, delta: str) -> list[str]:
        out = self.open_message()
        self.text.append(delta)
        i = self._index("message")
        out.append(
            self.event(
                "response.output_text.delta",
                item_id=self.msg_id,
                output_index=i,
                content_index=0,
                delta=delta,
                logprobs=[],
            )
        )
        return out

    def tool_delta(self, d: dict[str, Any]) -> list[str]:
        k = int(d.get("index", 0))
        fn = d.get("function") or {}
        out = []
        if k not in self.calls:
            call_id = d.get("id") or "call_" + uuid.uuid4().hex
            self.calls[k] = {
                "id": call_id,
                "function": {"name": fn.get("name") or "", "arguments": ""},
            }
            self.order.append(k)
            item = function_call_item(self.calls[k], "in_progress")
            out.append(
                self.event("response.output_item.added", output_index=self._index(k), item=item)
            )
        call = self.calls[k]
        if fn.get("name") and not call["function"]["name"]:
            call["function"]["name"] = fn["name"]
        piece = fn.get("arguments") or ""
        if piece:
            call["function"]["arguments"] += piece
            out.append(
                self.event(
                    "response.function_call_arguments.delta",
                    item_id=function_call_item(call, "in_progress")["id"],
                    output_index=self._index(k),
                    delta=piece,
                )
            )
        return out

    def close(self) -> list[str]:
        """The closing events of every item, in output order (an answer with neither text nor
        a call still has its empty message)."""
        out = [] if self.order else self.open_message()
        full = "".join(self.text)
        for key in self.order:
            i = self._index(key)
            if key == "message":
                part = {"type": "output_text", "text": full, "annotations": []}
                item = {
                    "type": "message",
                    "id": self.msg_id,
                    "status": "completed",
                    "role": "assistant",
                    "content": [part],
                }
                out += [
                    self.event(
                        "response.output_text.done",
                        item_id=self.msg_id,
                        output_index=i,
                        content_index=0,
                        text=full,
                        logprobs=[],
                    ),
                    self.event(
                        "response.content_part.done",
                        item_id=self.msg_id,
                        output_index=i,
                        content_index=0,
                        part=part,
                    ),
                    self.event("response.output_item.done", output_index=i, item=item),
                ]
            else:
                item = function_call_item(self.calls[key], "completed")
                out += [
                    self.event(
                        "response.function_call_arguments.done",
                        item_id=item["id"],
                        output_index=i,
                        arguments=item["arguments"],
                    ),
                    self.event("response.output_item.done", output_index=i, item=item),
                ]
        return out


async def stream_events(chunks: AsyncIterator[Any], rid: str, created: int) -> AsyncIterator[str]:
    seq = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal seq
        seq += 1
        data = json.dumps({"type": kind, "sequence_number": seq - 1, **fields})
        return f"event: {kind}\ndata: {data}\n\n"

    model, finish, usage = "", None, None
    items = _StreamedOutput(rid, event)
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
                    head = response_object(rid, model, created, "", "in_progress", None)
                    yield event("response.created", response=head)
                    yield event("response.in_progress", response=head)
                if chunk.get("usage"):
                    usage = usage_object(chunk["usage"])
                for choice in chunk.get("choices", []):
                    delta = choice.get("delta") or {}
                    out = items.text_delta(delta["content"]) if delta.get("content") else []
                    for call in delta.get("tool_calls") or []:
                        out += items.tool_delta(call)
                    for e in out:
                        yield e
                    finish = choice.get("finish_reason") or finish
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            await close()  # a client gone mid-stream: the chat stream aborts the request
    for e in items.close():
        yield e
    status = "incomplete" if finish == "length" else "completed"
    calls = [items.calls[k] for k in items.order if k != "message"]
    final = response_object(rid, model, created, "".join(items.text), status, usage, calls)
    yield event(
        "response.incomplete" if status == "incomplete" else "response.completed", response=final
    )
