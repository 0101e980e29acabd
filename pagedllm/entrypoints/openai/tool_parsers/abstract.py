"""What every tool-call parser provides, and the registry ``--tool-call-parser`` names.

A parser reads the text a model generated and splits it into content and tool calls, in two
ways that agree on well-formed output:

* ``extract(text)`` on the whole text: ``(content or None, [ToolCall])``; text that does not
  parse as a tool call stays content;
* ``streamer()``: a fresh ``ToolCallStreamer`` per choice, fed the text deltas as they come
  (``feed``) and told when the generation ends (``finish``). It returns ``DeltaMessage``s:
  content deltas (never the tool-call markup; text that might still turn out to be markup is
  held back) and tool-call deltas in OpenAI's streaming shape: a call's first delta carries its
  index, id, type, name and ``arguments: ""``; its later deltas carry fragments of the
  arguments' JSON text, which add up to the ``arguments`` that ``extract`` returns.

Arguments are the JSON text of the arguments object as the model wrote it. A streamer must
decide early, so it may send a call whose JSON later turns out broken (cut off by
``max_tokens``, say) where ``extract``, seeing the whole text, keeps that text as content.
"""

from __future__ import annotations

import secrets
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar


def new_call_id() -> str:
    """A unique tool-call id, spelled as OpenAI's: ``call_`` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


@dataclass
class ToolCall:
    """One complete function call: its name and its arguments as JSON text."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class ToolCallDelta:
    """A piece of a streamed call: the first one has ``id`` and ``name`` (and arguments "")."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {
            "index": self.index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class DeltaMessage:
    """What one ``feed`` or ``finish`` yields: new content and new tool-call pieces."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.tool_calls)

    def extend(self, other: DeltaMessage) -> DeltaMessage:
        self.content += other.content
        self.tool_calls.extend(other.tool_calls)
        return self


class ToolCallStreamer(ABC):
    """Splits one choice's streamed text into content and tool-call deltas."""

    @abstractmethod
    def feed(self, text: str) -> DeltaMessage:
        """The deltas ``text`` (the next piece of the output) makes certain."""

    @abstractmethod
    def finish(self) -> DeltaMessage:
        """The generation ended: everything still held back."""


class ToolParser(ABC):
    """Parses one model family's tool-call format (see the module doc)."""

    name: ClassVar[str]

    @abstractmethod
    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The content (None if none is left) and the tool calls of a whole output."""

    @abstractmethod
    def streamer(self) -> ToolCallStreamer:
        """A streaming extractor for one choice."""


def accumulate(messages: Iterable[DeltaMessage]) -> tuple[str | None, list[ToolCall]]:
    """Content and calls of a stream of deltas, as a client accumulates them."""
    content = ""
    calls: dict[int, ToolCall] = {}
    for m in messages:
        content += m.content
        for d in m.tool_calls:
            if d.id is not None:
                calls[d.index] = ToolCall(d.name or "", d.arguments, d.id)
            else:
                calls[d.index].arguments += d.arguments
    return content or None, [calls[i] for i in sorted(calls)]


TOOL_PARSERS: dict[str, type[ToolParser]] = {}


def register_tool_parser(name: str) -> Callable[[type[ToolParser]], type[ToolParser]]:
    """Class decorator: make the parser available as ``--tool-call-parser NAME``."""

    def register(cls: type[ToolParser]) -> type[ToolParser]:
        if name in TOOL_PARSERS:
            raise ValueError(f"Tool-call parser {name!r} is already registered.")
        cls.name = name
        TOOL_PARSERS[name] = cls
        return cls

    return register


def get_tool_parser(name: str) -> ToolParser:
    """An instance of the parser registered as ``name``; ValueError naming the known ones."""
    cls = TOOL_PARSERS.get(name)
    if cls is None:
        known = ", ".join(sorted(TOOL_PARSERS))
        raise ValueError(f"Unknown tool-call parser {name!r}; available: {known}.")
    return cls()


def partial_suffix(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that begins one of ``tags`` (held back until the
    next delta tells whether it is markup)."""
    best = 0
    for tag in tags:
        for k in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:k]):
                best = k
                break
    return best
