"""The shapes of ``/v1/responses``: the ``response`` object, its usage, and its streamed form
(chat completion chunks in, Responses events out).

``responses_api.py`` runs a streamed request as a streamed chat completion; this turns its SSE
chunks into the Responses event sequence clients expect, numbered by ``sequence_number``:
``response.created`` and ``response.in_progress`` (with the response still empty),
``response.output_item.added`` and ``response.content_part.added`` for the one message, a
``response.output_text.delta`` per text piece, then ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done`` and ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut the answer). An error chunk becomes an
``error`` event. Closing this stream (the client went away) closes the chat stream, which
aborts the request in the engine.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any


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
    calls = [
        {
            "type": "function_call",
            "id": "fc_" + uuid.uuid4().hex,
            "call_id": c["id"],
            "name": c["function"]["name"],
            "arguments": c["function"]["arguments"],
            "status": "completed",
        }
        for c in tool_calls or []
    ]
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


async def stream_events(chunks: AsyncIterator[Any], rid: str, created: int) -> AsyncIterator[str]:
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
                    head = response_object(rid, model, created, "", "in_progress", None)
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
                    usage = usage_object(chunk["usage"])
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
    final = response_object(rid, model, created, full, status, usage)
    yield event("response.output_item.done", output_index=0, item=final["output"][0])
    yield event(
        "response.incomplete" if status == "incomplete" else "response.completed", response=final
    )
