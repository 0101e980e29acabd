"""``hermes``: Hermes / Qwen2.5 style calls, each a ``<tool_call>`` block holding one JSON
object ``{"name": ..., "arguments": {...}}`` (``"parameters"`` is read too), as many blocks as
calls.

Text outside the blocks is content, verbatim except for the whitespace that touches a call
block (the newlines around ``<tool_call>`` ... ``</tool_call>``). A block whose JSON is not a
call (no name, arguments that are not an object, not JSON) stays content, markup and all; a
last block that is never closed still counts when its object is complete. Anything after the
object inside a block is dropped.
"""

from __future__ import annotations

from pagedllm.entrypoints.openai.tool_parsers.abstract import (
    DeltaMessage,
    ToolCall,
    ToolCallStreamer,
    ToolParser,
    partial_suffix,
    register_tool_parser,
)
from pagedllm.entrypoints.openai.tool_parsers.call_scanner import (
    CallScanner,
    StreamedCall,
    parse_call,
)

START, END = "<tool_call>", "</tool_call>"
_ARGS_KEYS = ("arguments", "parameters")


def _block_end(text: str, pos: int) -> int:
    """Where a call block whose object ended at ``pos`` ends: after its ``</tool_call>``, at
    the next ``<tool_call>`` if that comes first, or at the end of the text."""
    close, nxt = text.find(END, pos), text.find(START, pos)
    if close >= 0 and (nxt < 0 or close < nxt):
        return close + len(END)
    return nxt if nxt >= 0 else len(text)


def _join(parts: list[str | None]) -> str:
    """Content from text parts and call blocks (None): whitespace touching a block goes."""
    out = ""
    for i, part in enumerate(parts):
        if part is None:
            continue
        if i > 0 and parts[i - 1] is None:
            part = part.lstrip()
        if i + 1 < len(parts) and parts[i + 1] is None:
            part = part.rstrip()
        out += part
    return out


@register_tool_parser("hermes")
class HermesToolParser(ToolParser):
    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        calls: list[ToolCall] = []
        parts: list[str | None] = []  # text, or None for a call block
        pos = 0
        while (begin := text.find(START, pos)) >= 0:
            body = begin + len(START)
            scanner, end, ok = parse_call(text, body, _ARGS_KEYS)
            if ok:
                parts += [text[pos:begin], None]
                calls.append(ToolCall(scanner.name or "", scanner.arguments))
                pos = _block_end(text, end)
            else:  # not a call: the block, up to its closing tag, is content
                close = text.find(END, body)
                stop = len(text) if close < 0 else close + len(END)
                parts.append(text[pos:stop])
                pos = stop
        if not calls:
            return text, []
        parts.append(text[pos:])
        # Adjacent text parts first, so that whitespace is stripped across them.
        merged: list[str | None] = []
        for p in parts:
            if p is not None and merged and merged[-1] is not None:
                merged[-1] = merged[-1] + p  # type: ignore[operator]
            else:
                merged.append(p)
        return _join(merged) or None, calls

    def streamer(self) -> ToolCallStreamer:
        return HermesStreamer()


_TEXT, _CALL, _AFTER_CALL, _BAD = range(4)


class HermesStreamer(ToolCallStreamer):
    """``HermesToolParser`` as the text streams (see ``abstract.py`` for the contract)."""

    def __init__(self) -> None:
        self.mode = _TEXT
        self.pending = ""  # the end of the last delta, possibly the start of a tag
        self.held_ws = ""  # trailing whitespace of the content, sent once text follows it
        self.skip_ws = False  # right after a call block: whitespace is dropped
        self.raw = ""  # the current block's text, content again if it is not a call
        self.call: StreamedCall | None = None
        self.num_calls = 0

    def _content(self, text: str) -> str:
        """The content to send for ``text`` outside any block (whitespace rules applied)."""
        if self.skip_ws:
            text = text.lstrip()
            if not text:
                return ""
            self.skip_ws = False
        body = text.rstrip()
        if not body:
            self.held_ws += text
            return ""
        out = self.held_ws + body
        self.held_ws = text[len(body) :]
        return out

    def feed(self, text: str) -> DeltaMessage:
        out = DeltaMessage()
        buf, self.pending = self.pending + text, ""
        pos = 0
        while pos < len(buf):
            if self.mode == _TEXT:
                begin = buf.find(START, pos)
                if begin < 0:
                    keep = partial_suffix(buf[pos:], (START,))
                    out.content += self._content(buf[pos : len(buf) - keep])
                    self.pending = buf[len(buf) - keep :]
                    break
                out.content += self._content(buf[pos:begin])
                self.raw, self.held_ws = self.held_ws + START, ""
                self.call = StreamedCall(self.num_calls, CallScanner(_ARGS_KEYS))
                self.mode, pos = _CALL, begin + len(START)
            elif self.mode == _CALL:
                assert self.call is not None
                scanner = self.call.scanner
                end = scanner.feed(buf, pos)
                self.raw += buf[pos:end]
                pos = end
                out.tool_calls += self.call.deltas()
                if scanner.done or scanner.failed:
                    if self.call.announced:
                        self.num_calls += 1
                        self.mode = _AFTER_CALL
                    else:
                        self.mode = _BAD
            elif self.mode == _AFTER_CALL:
                close, nxt = buf.find(END, pos), buf.find(START, pos)
                if close >= 0 and (nxt < 0 or close < nxt):
                    self._end_call()
                    pos = close + len(END)
                elif nxt >= 0:
                    self._end_call()
                    pos = nxt
                else:
                    keep = partial_suffix(buf[pos:], (START, END))
                    self.pending = buf[len(buf) - keep :]
                    break
            else:  # _BAD: the block is content, up to its closing tag
                close = buf.find(END, pos)
                if close < 0:
                    keep = partial_suffix(buf[pos:], (END,))
                    self.raw += buf[pos : len(buf) - keep]
                    self.pending = buf[len(buf) - keep :]
                    break
                out.content += self._content(self.raw + buf[pos : close + len(END)])
                self.raw, self.mode, pos = "", _TEXT, close + len(END)
        return out

    def _end_call(self) -> None:
        self.raw, self.call, self.mode, self.skip_ws = "", None, _TEXT, True

    def finish(self) -> DeltaMessage:
        out = DeltaMessage()
        if self.mode == _TEXT:
            out.content += self._content(self.pending)
        elif self.mode == _CALL and self.call is not None and self.call.announced:
            self.num_calls += 1  # cut off inside its arguments: sent as far as it got
        elif self.mode in (_CALL, _BAD):
            out.content += self._content(self.raw + self.pending)
        out.content += self.held_ws
        self.pending = self.held_ws = self.raw = ""
        self.mode = _TEXT
        return out
