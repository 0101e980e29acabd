"""Parsers of the outputs that ``tool_choice`` forces with a grammar (not model formats, so not
in the registry):

* ``NamedCallParser``: a named function; the whole output is its arguments object.
* ``RequiredCallsParser``: ``"required"``; the output is a JSON array of one or more
  ``{"name": ..., "parameters": {...}}`` objects (``required_calls_schema``).

The grammar makes the output parse; only ``max_tokens`` can cut it short, and then the last
call keeps the arguments it got.
"""

from __future__ import annotations

from typing import Any

from pagedllm.entrypoints.openai.tool_parsers.abstract import (
    DeltaMessage,
    ToolCall,
    ToolCallDelta,
    ToolCallStreamer,
    ToolParser,
    accumulate,
    new_call_id,
)
from pagedllm.entrypoints.openai.tool_parsers.call_scanner import CallScanner, StreamedCall

_WS = " \t\r\n"


class NamedCallParser(ToolParser):
    name = "named"

    def __init__(self, function: str) -> None:
        self.function = function

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        return None, [ToolCall(self.function, text.lstrip())]

    def streamer(self) -> ToolCallStreamer:
        return _NamedStreamer(self.function)


class _NamedStreamer(ToolCallStreamer):
    def __init__(self, function: str) -> None:
        self.function = function
        self.id: str | None = None
        self.started = False  # the arguments' first non-blank character came

    def feed(self, text: str) -> DeltaMessage:
        out = DeltaMessage()
        if self.id is None:
            self.id = new_call_id()
            out.tool_calls.append(ToolCallDelta(0, "", self.id, self.function))
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        if text:
            out.tool_calls.append(ToolCallDelta(0, text))
        return out

    def finish(self) -> DeltaMessage:
        return self.feed("") if self.id is None else DeltaMessage()


def _has_local_ref(node: Any) -> bool:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            return True
        return any(_has_local_ref(v) for v in node.values())
    return isinstance(node, list) and any(_has_local_ref(v) for v in node)


def _rebase(node: Any, base: str) -> Any:
    """A copy of ``node`` whose local ``$ref``s (``#/$defs/X``, ``#``) point under ``base``."""
    if isinstance(node, dict):
        return {
            k: base + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#")
            else _rebase(v, base)
            for k, v in node.items()
        }  # fmt: skip
    if isinstance(node, list):
        return [_rebase(v, base) for v in node]
    return node


def required_calls_schema(
    tools: list[tuple[str, dict[str, Any]]], parallel: bool
) -> dict[str, Any]:
    """The JSON schema of ``"required"``'s output for ``(name, parameters schema)`` pairs: an
    array of one or more calls (exactly one unless ``parallel``). A parameters schema with
    local references (``$defs`` and ``$ref``, as pydantic writes them) moves to the root's
    ``$defs``, its references rebased, so that they still resolve."""
    defs: dict[str, Any] = {}
    items = []
    for i, (name, params) in enumerate(tools):
        if _has_local_ref(params):
            key = f"tool{i}"
            defs[key] = _rebase(params, f"#/$defs/{key}")
            params = {"$ref": f"#/$defs/{key}"}
        items.append(
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [name]}, "parameters": params},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {
        "type": "array",
        "items": items[0] if len(items) == 1 else {"anyOf": items},
        "minItems": 1,
    }
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


class RequiredCallsParser(ToolParser):
    name = "required"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        s = self.streamer()
        _, calls = accumulate([s.feed(text), s.finish()])
        return None, calls

    def streamer(self) -> ToolCallStreamer:
        return _RequiredStreamer()


_OPEN, _ITEM, _CALL, _AFTER, _END = range(5)


class _RequiredStreamer(ToolCallStreamer):
    def __init__(self) -> None:
        self.mode = _OPEN
        self.call: StreamedCall | None = None
        self.num_calls = 0

    def feed(self, text: str) -> DeltaMessage:
        out = DeltaMessage()
        pos = 0
        while pos < len(text) and self.mode != _END:
            ch = text[pos]
            if self.mode == _CALL:
                assert self.call is not None
                pos = self.call.scanner.feed(text, pos)
                out.tool_calls += self.call.deltas()
                if self.call.scanner.failed:
                    self.mode = _END  # (the grammar rules this out)
                elif self.call.scanner.done:
                    self.num_calls += 1
                    self.mode = _AFTER
                continue
            if ch in _WS:
                pass
            elif self.mode == _OPEN and ch == "[":
                self.mode = _ITEM
            elif self.mode == _ITEM and ch == "{":
                self.call = StreamedCall(self.num_calls, CallScanner(("parameters",)))
                self.mode = _CALL
                continue  # the scanner reads the brace
            elif self.mode == _AFTER and ch == ",":
                self.mode = _ITEM
            else:  # "]" or anything unexpected: no more calls
                self.mode = _END
            pos += 1
        return out

    def finish(self) -> DeltaMessage:
        return DeltaMessage()
