"""Feeding a parser's streamer a text in pieces, and checking the stream against ``extract``."""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import pairwise

from pagedllm.entrypoints.openai.tool_parsers import (
    DeltaMessage,
    ToolCall,
    ToolParser,
    accumulate,
)


def pieces(text: str, cuts: list[int]) -> list[str]:
    bounds = [0, *sorted(cuts), len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


def stream(parser: ToolParser, parts: list[str]) -> list[DeltaMessage]:
    s = parser.streamer()
    return [*(s.feed(p) for p in parts), s.finish()]


def simple(result: tuple[str | None, list[ToolCall]]) -> tuple[str | None, list[tuple[str, str]]]:
    """Content (None for "") and (name, arguments) pairs: ids differ between runs."""
    content, calls = result
    return content or None, [(c.name, c.arguments) for c in calls]


def splits(text: str, seed: int = 0) -> Iterator[list[int]]:
    """Awkward ways to cut ``text``: every single cut, every pair of cuts a few characters
    apart, one character at a time, and random cuts."""
    n = len(text)
    for i in range(n + 1):
        yield [i]
    for i in range(n + 1):
        for j in range(i + 1, min(n, i + 12) + 1):
            yield [i, j]
    yield list(range(1, n))
    rng = random.Random(seed)
    for _ in range(50):
        yield rng.sample(range(1, n), min(n - 1, rng.randint(1, 8))) if n > 1 else []


def check_stream(parser: ToolParser, text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """Assert that however ``text`` is cut, the streamed deltas are well-formed and add up to
    what ``extract`` returns; return that."""
    expected = simple(parser.extract(text))
    for cuts in splits(text):
        msgs = stream(parser, pieces(text, cuts))
        assert simple(accumulate(msgs)) == expected, (cuts, msgs)
        check_deltas(msgs)
    return expected


def check_deltas(msgs: list[DeltaMessage]) -> None:
    """OpenAI's shape: a call's first delta has id, name and empty arguments, later ones
    arguments only; indices start at 0 and grow by one; ids are unique."""
    seen: dict[int, str] = {}
    for m in msgs:
        for d in m.tool_calls:
            if d.id is None:
                assert d.index in seen and d.name is None and d.arguments, d
            else:
                assert d.index == len(seen) and d.name and d.arguments == "", d
                assert d.id.startswith("call_") and d.id not in seen.values()
                seen[d.index] = d.id
