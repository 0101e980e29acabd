"""An incremental reader of one tool-call JSON object, ``{"name": ..., "arguments": {...}}``.

Parsers feed it text as it streams; it reports the function name once its string has closed,
and the raw text of the arguments object as it grows, without waiting for the object to end.
It understands JSON's structure (strings, escapes, nesting) but not every detail of its
grammar: ``extract`` checks a finished object with ``json.loads`` before trusting it.
``StreamedCall`` turns a reader's progress into OpenAI tool-call deltas.
"""

from __future__ import annotations

import json

from pagedllm.entrypoints.openai.tool_parsers.abstract import ToolCallDelta, new_call_id

_WS = " \t\r\n"
# States of the reader (at the top level of the object unless said otherwise).
_START, _KEY_OR_END, _KEY_START, _KEY, _COLON, _VALUE = range(6)
_NAME, _ARGS, _SKIP_STR, _SKIP_NEST, _SKIP_PRIM, _AFTER_VALUE = range(6, 12)
_DONE, _FAILED = 12, 13


class CallScanner:
    """Reads one call object a character at a time (see the module doc).

    ``args_keys`` are the keys whose value holds the arguments (the first one present counts);
    it must be an object. A name that is not a string, arguments that are not an object, or
    text that is not an object at all make the reader ``failed``.
    """

    def __init__(self, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> None:
        self.args_keys = args_keys
        self.state = _START
        self.name: str | None = None
        self.args = ""  # raw text of the arguments object so far
        self.has_args = False
        self.start = -1  # offset of the opening brace in the text given to ``feed``
        self._buf = ""  # raw characters of the key or name being read
        self._key = ""
        self._depth = 0
        self._in_str = False
        self._esc = False

    @property
    def done(self) -> bool:
        return self.state == _DONE

    @property
    def failed(self) -> bool:
        return self.state == _FAILED

    @property
    def ready(self) -> bool:
        """The call can be announced: its name is known and its arguments have begun (or the
        object ended without any)."""
        return self.name is not None and self.state != _FAILED and (self.has_args or self.done)

    @property
    def arguments(self) -> str:
        """The arguments' JSON text; ``{}`` when the object has none."""
        return self.args if self.has_args else "{}"

    def feed(self, text: str, pos: int = 0) -> int:
        """Read ``text`` from ``pos`` until the object ends, fails, or the text runs out;
        return the offset after the last character read (a failing one is not read)."""
        n = len(text)
        while pos < n and self.state < _DONE:
            if self._step(text[pos], pos):
                pos += 1
        return pos

    def _nested(self, ch: str) -> bool:
        """Track strings and brackets inside a nested value; True when the value closed."""
        if self._in_str:
            if self._esc:
                self._esc = False
            elif ch == "\\":
                self._esc = True
            elif ch == '"':
                self._in_str = False
        elif ch == '"':
            self._in_str = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            return self._depth == 0
        return False

    def _string(self, ch: str) -> bool:
        """Collect a key or name; True when its closing quote came."""
        if self._esc:
            self._esc = False
        elif ch == "\\":
            self._esc = True
        elif ch == '"':
            return True
        self._buf += ch
        return False

    def _step(self, ch: str, pos: int) -> bool:
        """Advance by one character; False when ``ch`` is not consumed (the reader failed)."""
        s = self.state
        if s in (_START, _KEY_OR_END, _KEY_START, _COLON, _VALUE, _AFTER_VALUE) and ch in _WS:
            return True
        if s == _START:
            if ch != "{":
                return self._fail()
            self.start, self.state = pos, _KEY_OR_END
        elif s in (_KEY_OR_END, _KEY_START):
            if ch == "}" and s == _KEY_OR_END:
                self.state = _DONE
            elif ch == '"':
                self._buf, self.state = "", _KEY
            else:
                return self._fail()
        elif s == _KEY:
            if self._string(ch):
                key = _decode(self._buf)
                if key is None:
                    return self._fail()
                self._key, self.state = key, _COLON
        elif s == _COLON:
            if ch != ":":
                return self._fail()
            self.state = _VALUE
        elif s == _VALUE:
            return self._value(ch)
        elif s == _NAME:
            if self._string(ch):
                self.name = _decode(self._buf)
                if self.name is None:
                    return self._fail()
                self.state = _AFTER_VALUE
        elif s == _ARGS:
            self.args += ch
            if self._nested(ch):
                self.state = _AFTER_VALUE
        elif s == _SKIP_STR:
            if self._string(ch):
                self.state = _AFTER_VALUE
        elif s == _SKIP_NEST:
            if self._nested(ch):
                self.state = _AFTER_VALUE
        elif s == _SKIP_PRIM:
            if ch in _WS:
                self.state = _AFTER_VALUE
            elif ch == ",":
                self.state = _KEY_START
            elif ch == "}":
                self.state = _DONE
        elif s == _AFTER_VALUE:
            if ch == ",":
                self.state = _KEY_START
            elif ch == "}":
                self.state = _DONE
            else:
                return self._fail()
        return True

    def _value(self, ch: str) -> bool:
        """The first character of a value: the name, the arguments, or one to skip."""
        if self._key == "name" and self.name is None:
            if ch != '"':
                return self._fail()
            self._buf, self.state = "", _NAME
        elif self._key in self.args_keys and not self.has_args:
            if ch != "{":
                return self._fail()
            self.has_args, self.args = True, "{"
            self._depth, self._in_str, self._esc = 1, False, False
            self.state = _ARGS
        elif ch == '"':
            self._buf, self.state = "", _SKIP_STR
        elif ch in "{[":
            self._depth, self._in_str, self._esc = 1, False, False
            self.state = _SKIP_NEST
        else:
            self.state = _SKIP_PRIM
        return True

    def _fail(self) -> bool:
        self.state = _FAILED
        return False


def _decode(raw: str) -> str | None:
    try:
        value = json.loads('"' + raw + '"')
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def parse_call(text: str, pos: int, args_keys: tuple[str, ...]) -> tuple[CallScanner, int, bool]:
    """Read one call object of ``text`` from ``pos`` (leading whitespace allowed): the reader,
    the offset after it, and whether it is a complete, valid call (valid JSON too)."""
    scanner = CallScanner(args_keys)
    end = scanner.feed(text, pos)
    if not scanner.done or scanner.name is None:
        return scanner, end, False
    try:
        obj = json.loads(text[scanner.start : end])
    except ValueError:
        return scanner, end, False
    return scanner, end, isinstance(obj, dict)


class StreamedCall:
    """A call being streamed: announces it once ``ready``, then sends its arguments' growth."""

    def __init__(self, index: int, scanner: CallScanner) -> None:
        self.index = index
        self.scanner = scanner
        self.id: str | None = None
        self._sent = 0

    @property
    def announced(self) -> bool:
        return self.id is not None

    def deltas(self) -> list[ToolCallDelta]:
        """The deltas the reader's progress allows (the header alone on its own first)."""
        s = self.scanner
        out: list[ToolCallDelta] = []
        if self.id is None:
            if not s.ready:
                return out
            self.id = new_call_id()
            out.append(ToolCallDelta(self.index, "", self.id, s.name))
        args = s.args if s.has_args else ("{}" if s.done else "")
        if len(args) > self._sent:
            out.append(ToolCallDelta(self.index, args[self._sent :]))
            self._sent = len(args)
        return out
