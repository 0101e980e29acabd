"""The llguidance backend and the manager: compile errors are ValueErrors with the library's
message, masks allow exactly the grammar's next tokens (never ids past the tokenizer), the
LRU cache compiles a constraint once, and matchers follow accepted tokens to completion."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from pagedllm.core.scheduler_output import ScheduledSequence, SchedulerOutput
from pagedllm.structured_output import StructuredOutputsParams
from pagedllm.structured_output.backend import bitmask_width, get_backend
from pagedllm.structured_output.manager import StructuredOutputManager

EXTRA = 37  # model vocabulary larger than the tokenizer's (padded embeddings)


def _allowed(bitmask: np.ndarray, row: int, vocab: int) -> list[int]:
    return [t for t in range(vocab) if (int(bitmask[row, t // 32]) >> (t % 32)) & 1]


@pytest.fixture(scope="module")
def backend(tiny_tokenizer: Any) -> Any:
    vocab = len(tiny_tokenizer) + EXTRA
    return get_backend("llguidance", tiny_tokenizer, vocab, [tiny_tokenizer.eos_token_id])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"regex": "(unclosed"}, "unclosed group"),
        ({"json": {"type": "nonsense"}}, "nonsense"),
        ({"grammar": "start: undefined_rule"}, "undefined_rule"),
    ],
)
def test_bad_constraints_are_value_errors(backend: Any, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        backend.compile(StructuredOutputsParams(**kw))


def test_regex_walk_produces_a_match(backend: Any, tiny_tokenizer: Any) -> None:
    """Follow the mask (always the smallest allowed id) to the end: the text matches."""
    vocab = backend.vocab_size
    m = backend.matcher(backend.compile(StructuredOutputsParams(regex="[ab]{2}-[0-9]{3}")))
    bitmask = np.zeros((1, bitmask_width(vocab)), dtype=np.int32)
    tokens: list[int] = []
    eos = tiny_tokenizer.eos_token_id
    while not m.is_finished and len(tokens) < 50:
        bitmask[:] = 0
        m.fill_bitmask(bitmask, 0)
        allowed = _allowed(bitmask, 0, vocab)
        assert allowed and max(allowed) < len(tiny_tokenizer)  # no id past the tokenizer
        token = min(t for t in allowed if t != eos) if allowed != [eos] else eos
        assert m.accept([token])
        tokens.append(token)
    assert m.is_finished  # nothing can follow the last digit: done without waiting for EOS
    text_tokens = tokens[:-1] if tokens[-1] == eos else tokens
    assert re.fullmatch("[ab]{2}-[0-9]{3}", tiny_tokenizer.decode(text_tokens))


def test_matchers_of_one_grammar_are_independent(backend: Any, tiny_tokenizer: Any) -> None:
    """Every request's matcher is a copy of the compiled grammar's start state: advancing
    one moves neither the others nor the cached grammar."""
    grammar = backend.compile(StructuredOutputsParams(choice=["ab", "cd"]))
    first, second = backend.matcher(grammar), backend.matcher(grammar)
    vocab = backend.vocab_size
    start = np.zeros((1, bitmask_width(vocab)), dtype=np.int32)
    second.fill_bitmask(start, 0)
    assert first.accept(tiny_tokenizer.encode("ab", add_special_tokens=False))
    assert first.is_finished
    for m in (second, backend.matcher(grammar)):
        again = np.zeros_like(start)
        m.fill_bitmask(again, 0)
        assert not m.is_finished and np.array_equal(again, start)


def test_refused_token(backend: Any, tiny_tokenizer: Any) -> None:
    m = backend.matcher(backend.compile(StructuredOutputsParams(choice=["yes"])))
    bad = tiny_tokenizer.encode("zzz", add_special_tokens=False)[0]
    assert not m.accept([bad])


def test_manager_caches_and_fills_step_rows(tiny_tokenizer: Any) -> None:
    vocab = len(tiny_tokenizer) + EXTRA
    mgr = StructuredOutputManager(tiny_tokenizer, vocab, [tiny_tokenizer.eos_token_id])
    params = StructuredOutputsParams(choice=["yes", "no"])
    assert mgr.compile(params) is mgr.compile(StructuredOutputsParams(choice=["yes", "no"]))
    mgr.add_sequence("a", params)
    mgr.add_sequence("b#1", params)
    step = SchedulerOutput(
        scheduled=[
            ScheduledSequence("free", 0, 3, [0], sample_seq_ids=["free"]),
            ScheduledSequence("b", 0, 3, [1], sample_seq_ids=["b", "b#1"]),  # fork on first
            ScheduledSequence("a", 0, 3, [2], sample_seq_ids=["a"]),
        ]
    )
    mgr.fill_step(step)
    assert step.structured_seq_ids == ["b#1", "a"]
    assert step.grammar_bitmask.shape == (2, bitmask_width(vocab))
    first = {tiny_tokenizer.decode([t]) for t in _allowed(step.grammar_bitmask, 1, vocab)}
    assert first and all("yes".startswith(s) or "no".startswith(s) for s in first)
    mgr.remove_sequence("a")
    assert "a" not in mgr and len(mgr) == 1


def test_manager_reports_an_unusable_backend(tiny_tokenizer: Any) -> None:
    mgr = StructuredOutputManager(tiny_tokenizer, 10, [0], backend="no-such-backend")
    with pytest.raises(ValueError, match="unavailable.*no-such-backend"):
        mgr.compile(StructuredOutputsParams(regex="a"))


def test_parallel_fill_equals_one_by_one(backend: Any) -> None:
    """Enough rows for llguidance's threads: the same masks as filling each row in turn."""
    grammars = [StructuredOutputsParams(regex=f"[a-c]{{{k}}}x") for k in range(1, 4)] + [
        StructuredOutputsParams(json={"type": "array", "items": {"type": "integer"}}),
        StructuredOutputsParams(choice=["red", "green"]),
    ]
    matchers = [backend.matcher(backend.compile(g)) for g in grammars + grammars]
    width = bitmask_width(backend.vocab_size)
    together = np.zeros((len(matchers), width), dtype=np.int32)
    backend.fill_bitmasks(matchers, together)
    alone = np.zeros_like(together)
    for row, m in enumerate(matchers):
        m.fill_bitmask(alone, row)
    assert len(matchers) >= 4 and np.array_equal(together, alone) and together.any()


def test_compile_time_limit(tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compilation that outlasts the limit is a ValueError; the manager keeps working."""
    import threading

    mgr = StructuredOutputManager(tiny_tokenizer, len(tiny_tokenizer), [0])
    release = threading.Event()
    real = mgr.backend.compile

    def slow(params: StructuredOutputsParams) -> Any:
        if params.regex == "slow":
            release.wait(10)
        return real(params)

    monkeypatch.setattr(mgr.backend, "compile", slow)
    mgr.compile_timeout_s = 0.2
    with pytest.raises(ValueError, match="took longer than 0.2 s"):
        mgr.compile(StructuredOutputsParams(regex="slow"))
    assert mgr.compile(StructuredOutputsParams(regex="fast")) is not None  # another thread
    release.set()


def test_a_backend_crash_is_the_requests_error(tiny_tokenizer: Any) -> None:
    """Whatever a compilation raises reaches the request as a ValueError (a 400), never the
    engine loop as another exception."""
    mgr = StructuredOutputManager(tiny_tokenizer, len(tiny_tokenizer), [0])

    def broken(params: StructuredOutputsParams) -> Any:
        raise RuntimeError("backend bug")

    mgr.backend.compile = broken  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="compiling the constraint failed: RuntimeError"):
        mgr.compile(StructuredOutputsParams(regex="x"))
