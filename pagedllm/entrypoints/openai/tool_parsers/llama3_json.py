"""``llama3_json``: Llama 3.1 / 3.2 JSON calls. The output is one call object
``{"name": ..., "parameters": {...}}`` (``"arguments"`` is read too), or several separated by
``;``, optionally after ``<|python_tag|>``.

An output that does not begin with a call object (whitespace and the tag aside) is content,
verbatim. After the calls that parse, anything else (text, a broken object) is content, from
its first character; whitespace and separators between and after calls are dropped.
"""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.abstract import (
    DeltaMessage,
    ToolCall,
    ToolCallStreamer,
    ToolParser,
    register_tool_parser,
)
from pagedllm.entrypoints.openai.tool_parsers.call_scanner import (
    CallScanner,
    StreamedCall,
    parse_call,
)

PYTHON_TAG = "<|python_tag|>"
_ARGS_KEYS = ("parameters", "arguments")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _first_object(text: str) -> int:
    """Offset of the first call object's brace, or -1 when the output does not begin with one."""
    pos = _skip_ws(text, 0)
    if text.startswith(PYTHON_TAG, pos):
        pos = _skip_ws(text, pos + len(PYTHON_TAG))
    return pos if text.startswith("{", pos) else -1


def _undecided(text: str) -> bool:
    """Whether ``text`` (no object yet) may still turn out to begin with a call: whitespace,
    or (part of) the tag."""
    lead = text.lstrip()
    if lead.startswith(PYTHON_TAG):
        return not lead[len(PYTHON_TAG) :].strip()
    return PYTHON_TAG.startswith(lead)


@register_tool_parser("llama3_json")
class Llama3JsonToolParser(ToolParser):
    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        pos = _first_object(text)
        if pos < 0:
            return text, []
        calls: list[ToolCall] = []
        while True:
            scanner, end, ok = parse_call(text, pos, _ARGS_KEYS)
            if not ok:
                break
            calls.append(ToolCall(scanner.name or "", scanner.arguments))
            pos = _skip_ws(text, end)
            if pos == len(text) or text[pos] != ";":
                break
            pos = _skip_ws(text, pos + 1)
            if not text.startswith("{", pos):
                break
        if not calls:
            return text, []
        return text[pos:] or None, calls

    def streamer(self) -> ToolCallStreamer:
        return Llama3JsonStreamer()


_LEAD, _CALL, _BETWEEN, _SEP, _TEXT = range(5)


class Llama3JsonStreamer(ToolCallStreamer):
    """``Llama3JsonToolParser`` as the text streams (see ``abstract.py`` for the contract)."""

    def __init__(self) -> None:
        self.mode = _LEAD
        self.raw = ""  # text read but not sent: the lead-in, or the current object
        self.call: StreamedCall | None = None
        self.num_calls = 0

    def feed(self, text: str) -> DeltaMessage:
        out = DeltaMessage()
        if self.mode == _TEXT:
            out.content = text
            return out
        buf, pos = text, 0
        if self.mode == _LEAD:  # before the first object: decide call or content
            buf, self.raw = self.raw + text, ""
            start = _first_object(buf)
            if start < 0:
                if _undecided(buf):
                    self.raw = buf
                else:
                    out.content, self.mode = buf, _TEXT
                return out
            self.raw, pos = buf[:start], start
            self._new_call()
        while pos < len(buf) and self.mode != _TEXT:
            if self.mode == _CALL:
                assert self.call is not None
                scanner = self.call.scanner
                end = scanner.feed(buf, pos)
                self.raw += buf[pos:end]
                pos = end
                out.tool_calls += self.call.deltas()
                if scanner.failed or (scanner.done and not self.call.announced):
                    # Not a call: content from its first character (from the start of the
                    # output when it is the first object) to the end.
                    if self.call.announced:
                        self.num_calls += 1  # broken after it was sent: it stays a call
                    else:
                        out.content += self.raw
                    out.content += buf[pos:]
                    self.raw, self.mode = "", _TEXT
                    return out
                if scanner.done:
                    self.num_calls += 1
                    self.raw, self.mode = "", _BETWEEN
            else:  # _BETWEEN (expects ';') or _SEP (expects the next object)
                pos = _skip_ws(buf, pos)
                if pos == len(buf):
                    break
                if self.mode == _BETWEEN and buf[pos] == ";":
                    self.mode, pos = _SEP, pos + 1
                elif self.mode == _SEP and buf[pos] == "{":
                    self._new_call()
                else:
                    self.mode = _TEXT
                    out.content += buf[pos:]
                    return out
        return out

    def _new_call(self) -> None:
        self.call = StreamedCall(self.num_calls, CallScanner(_ARGS_KEYS))
        self.mode = _CALL

    def finish(self) -> DeltaMessage:
        out = DeltaMessage()
        if self.mode == _LEAD or (
            self.mode == _CALL and self.call is not None and not self.call.announced
        ):
            out.content = self.raw  # never became a call
        elif self.mode == _CALL:
            self.num_calls += 1  # cut off inside its arguments: sent as far as it got
        self.raw, self.mode = "", _TEXT
        return out
