"""Chat messages (and tools) to prompt token ids, through the model's chat template (or
``--chat-template``).

Messages become the dicts Hugging Face chat templates read: text parts joined, ``developer``
as ``system``, a ``tool`` message's ``tool_call_id`` kept, and an assistant turn's
``tool_calls`` with their ``arguments`` as objects (JSON text is parsed: templates expect
objects, as the Transformers documentation says; text that is not a JSON object is passed on
as it is). ``tools`` go to the template as OpenAI spells them.
"""

from __future__ import annotations

import json
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagedllm.engine.tokenizer import apply_chat_template
from pagedllm.entrypoints.openai.errors import bad_request
from pagedllm.entrypoints.openai.protocol import ChatMessage, MessageToolCall
from pagedllm.entrypoints.openai.server_state import check_unicode

_TEXT_PART_TYPES = ("text", "input_text")


def content_chars(messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None) -> int:
    """Characters of text in ``messages`` and ``tools`` (the template only adds to them)."""
    total = len(json.dumps(tools)) if tools else 0
    for m in messages:
        if isinstance(m.content, str):
            total += len(m.content)
        elif m.content is not None:
            total += sum(len(p.text or "") for p in m.content)
        for call in m.tool_calls or []:
            args = call.function.arguments
            total += len(call.function.name) + len(args if isinstance(args, str) else str(args))
    return total


def _tool_call(call: MessageToolCall) -> dict[str, Any]:
    args: Any = call.function.arguments
    if isinstance(args, str):
        try:
            parsed = json.loads(args)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            args = parsed
    function = {"name": call.function.name, "arguments": args}
    return {"id": call.id, "type": "function", "function": function}


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Request messages as chat-template dicts (see the module doc)."""
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
        d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        d["content"] = content
        if m.name is not None:
            d["name"] = m.name
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            d["tool_calls"] = [_tool_call(c) for c in m.tool_calls]
        for key in ("name", "tool_call_id"):
            if key in d:
                check_unicode(d[key], "messages")
        if m.tool_calls:
            check_unicode(json.dumps(d["tool_calls"], ensure_ascii=False), "messages")
        out.append(d)
    return out


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    chat_template: str | None,
    tools: list[dict[str, Any]] | None,
) -> list[int]:
    """Token ids of the conversation rendered with the chat template, ``tools`` passed to it
    (ValueError when the model has no template and none was given)."""
    return apply_chat_template(
        tokenizer,
        messages,
        add_generation_prompt,
        chat_template,
        tools,
        no_template_hint="start the server with --chat-template or use /v1/completions",
    )
