"""The grammar-backend interface: compile a constraint once, match one sequence's tokens.

A backend is built once per engine from the tokenizer and the model's vocabulary size (the
logits' width, which may exceed the tokenizer's: the extra ids are never allowed).
``compile`` checks a ``StructuredOutputsParams`` and returns a ``CompiledGrammar`` (cached by
the caller: one per distinct constraint); ``matcher`` starts a fresh ``GrammarMatcher`` for
one sequence from it. Errors are ``ValueError`` with the library's message, so a bad schema is
a 400 for that request and nothing else. Backends register by name, as attention backends do.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np

from pagedllm.structured_output.params import StructuredOutputsParams


def bitmask_width(vocab_size: int) -> int:
    """int32 words per row of an allowed-token bitmask (bit t % 32 of word t // 32)."""
    return (vocab_size + 31) // 32


class GrammarMatcher(ABC):
    """One sequence's position in its grammar."""

    @abstractmethod
    def accept(self, tokens: list[int]) -> bool:
        """Advance over ``tokens``; False if the grammar rejects one (nothing after it is
        consumed)."""

    @abstractmethod
    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]`` (int32 words)."""

    @property
    @abstractmethod
    def is_finished(self) -> bool:
        """The grammar is complete: nothing may follow (the sequence stops)."""


class CompiledGrammar:
    """A checked, compiled constraint; cheap to start matchers from."""


class GrammarBackend(ABC):
    name: str = ""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size

    @abstractmethod
    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        """Raise ValueError (the library's message) if the constraint does not compile."""

    @abstractmethod
    def matcher(self, grammar: CompiledGrammar) -> GrammarMatcher: ...

    def fill_bitmasks(self, matchers: list[GrammarMatcher], bitmask: np.ndarray) -> None:
        """Row i of ``bitmask`` gets ``matchers[i]``'s allowed tokens (a backend may fill the
        rows in parallel)."""
        for row, matcher in enumerate(matchers):
            matcher.fill_bitmask(bitmask, row)


_BACKENDS: dict[str, Callable[..., GrammarBackend]] = {}


def register_backend(name: str, factory: Callable[..., GrammarBackend]) -> None:
    _BACKENDS[name] = factory


def get_backend(name: str, tokenizer: Any, vocab_size: int, eos: list[int]) -> GrammarBackend:
    if name not in _BACKENDS:
        # Built-in backends register on import; import them lazily (their libraries are large).
        from pagedllm.structured_output import llguidance_backend  # noqa: F401
    if name not in _BACKENDS:
        raise ValueError(f"Unknown structured-output backend {name!r}; known: {sorted(_BACKENDS)}.")
    return _BACKENDS[name](tokenizer, vocab_size, eos)
