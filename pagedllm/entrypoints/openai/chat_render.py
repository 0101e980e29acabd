"""Chat messages (and tools) to prompt token ids, through the model's chat template (or
``--chat-template``).

Messages become the dicts Hugging Face chat templates read: text parts joined, ``developer``
as ``system``, a ``tool`` message's ``tool_call_id`` kept, and an assistant turn's
``tool_calls`` with their ``arguments`` as objects (JSON text is parsed: templates expect
objects, as the Transformers documentation says; text that is not a JSON object is passed on
as it is). ``tools`` go to the template as OpenAI spells them.

``image_url`` parts (a model that takes images only; a text-only model answers 400) stay where
they are: such a message's content goes to the template as a list of ``{"type": "text"}`` and
``{"type": "image"}`` parts, which templates like Qwen2-VL's render as the image placeholder,
and ``image_urls`` lists the images in the same order for the input processor.
"""

from __future__ import annotations

import json
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagedllm.engine.tokenizer import apply_chat_template
from pagedllm.entrypoints.openai.errors import bad_request
from pagedllm.entrypoints.openai.protocol import ChatMessage, MessageToolCall, TextContentPart
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


def _image_url(part: TextContentPart, i: int, images_allowed: bool) -> str:
    """The URL of image part ``part`` of ``messages[i]``; 400 when it cannot be used."""
    if not images_allowed:
        raise bad_request(
            f"messages[{i}]: unsupported content part type 'image_url'; this model is "
            "text-only (only text parts are supported).",
            "messages",
        )
    img = part.image_url
    if img is None:
        raise bad_request(f"messages[{i}]: an image_url part needs image_url.url.", "messages")
    if img.model_extra:
        name = next(iter(img.model_extra))
        raise bad_request(f"messages[{i}]: unsupported field image_url.{name}.", "messages")
    if img.detail not in (None, "auto"):
        raise bad_request(
            f"messages[{i}]: image_url.detail={img.detail!r} is not supported (only 'auto').",
            "messages",
        )
    return img.url


def image_urls(messages: list[ChatMessage]) -> list[str]:
    """The URLs of the ``image_url`` parts, in order (checked by ``template_messages``)."""
    return [
        p.image_url.url
        for m in messages
        if isinstance(m.content, list)
        for p in m.content
        if p.type == "image_url" and p.image_url is not None
    ]


def _part_content(m: ChatMessage, i: int, images_allowed: bool) -> str | list[dict[str, Any]]:
    """A list-content message's template content: joined text, or parts when it has images."""
    assert isinstance(m.content, list)
    texts: list[str] = []
    parts: list[dict[str, Any]] = []
    for part in m.content:
        if part.type == "image_url":
            _image_url(part, i, images_allowed)
            parts.append({"type": "image"})
            continue
        if part.type not in _TEXT_PART_TYPES or part.text is None:
            raise bad_request(
                f"messages[{i}]: unsupported content part type {part.type!r}; only text"
                + (" and image_url" if images_allowed else "")
                + " parts are supported.",
                "messages",
            )
        check_unicode(part.text, "messages")
        texts.append(part.text)
        parts.append({"type": "text", "text": part.text})
    if len(parts) == len(texts):
        return "\n".join(texts)
    return parts


def template_messages(
    messages: list[ChatMessage], images_allowed: bool = False
) -> list[dict[str, Any]]:
    """Request messages as chat-template dicts (see the module doc)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            content: str | list[dict[str, Any]] = _part_content(m, i, images_allowed)
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
