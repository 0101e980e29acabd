"""The llguidance grammar backend: JSON schema, regex, choice and Lark/GBNF grammars.

llguidance reads the tokenizer once (``LLTokenizer``, built at engine start; it takes a while
and holds the GIL), compiles a constraint in milliseconds, and computes a token mask per step
from a lazily built automaton, so schemas need no ahead-of-time expansion. A grammar that does
not compile, or exceeds the parser's limits, is a ``ValueError`` carrying llguidance's message.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np

from pagedllm.structured_output.backend import (
    CompiledGrammar,
    GrammarBackend,
    GrammarMatcher,
    register_backend,
)
from pagedllm.structured_output.params import StructuredOutputsParams

PARALLEL_FILL_MIN_ROWS = 4  # fewer constrained rows: fill them one by one on this thread


def _closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on every object schema that does not
    say (``disable_additional_properties``)."""
    if isinstance(schema, list):
        return [_closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed_objects(v) for k, v in schema.items()}
    if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON "grammars" form) of ``params``."""
    kind = params.kind
    if kind in ("json", "json_object"):
        schema: Any = {"type": "object"} if kind == "json_object" else params.json
        if isinstance(schema, bool):
            schema = {} if schema else {"not": {}}
        if params.disable_additional_properties:
            schema = _closed_objects(schema)
        schema = copy.copy(schema)
        guidance = dict(schema.get("x-guidance") or {})
        guidance.setdefault("whitespace_flexible", not params.disable_any_whitespace)
        if params.whitespace_pattern is not None:
            guidance["whitespace_pattern"] = params.whitespace_pattern
        schema["x-guidance"] = guidance
        return llguidance.grammar_from("json_schema", json.dumps(schema))
    if kind == "regex":
        return llguidance.grammar_from("regex", params.regex)
    if kind == "choice":
        return llguidance.grammar_from("choice", json.dumps(params.choice))
    assert params.grammar is not None
    return llguidance.grammar_from("grammar", params.grammar)


class _Compiled(CompiledGrammar):
    """A grammar's matcher in its start state: every request's matcher is a copy of it
    (``deep_copy`` takes under a microsecond; building a matcher from the grammar text takes
    about a millisecond, which a burst of 64 requests would spend on the engine loop)."""

    def __init__(self, template: llguidance.LLMatcher) -> None:
        self.template = template


class _Matcher(GrammarMatcher):
    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._m = matcher

    def accept(self, tokens: list[int]) -> bool:
        return bool(self._m.consume_tokens(tokens)) and not self._m.is_error()

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        llguidance.numpy.fill_next_token_bitmask(self._m, bitmask, row)

    @property
    def is_finished(self) -> bool:
        return bool(self._m.is_stopped())


class LLGuidanceBackend(GrammarBackend):
    name = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> None:
        super().__init__(tokenizer, vocab_size, eos_token_ids)
        self.ll_tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids) or None
        )
        # Large batches fill their masks on llguidance's own threads (outside the GIL).
        self._executor = llguidance.LLExecutor()

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        try:
            grammar = grammar_text(params)
        except Exception as e:  # llguidance raises ValueError or its own errors
            raise ValueError(f"structured outputs ({params.kind}): {e}") from e
        template = llguidance.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
        if template.is_error():
            raise ValueError(f"structured outputs ({params.kind}): {template.get_error().strip()}")
        return _Compiled(template)

    def fill_bitmasks(self, matchers: list[GrammarMatcher], bitmask: np.ndarray) -> None:
        if len(matchers) < PARALLEL_FILL_MIN_ROWS:
            super().fill_bitmasks(matchers, bitmask)
            return
        pairs = [(m._m, row) for row, m in enumerate(matchers) if isinstance(m, _Matcher)]
        assert len(pairs) == len(matchers)
        llguidance.numpy.fill_next_token_bitmask_par(self._executor, pairs, bitmask)

    def matcher(self, grammar: CompiledGrammar) -> GrammarMatcher:
        assert isinstance(grammar, _Compiled)
        return _Matcher(grammar.template.deep_copy())


register_backend(LLGuidanceBackend.name, LLGuidanceBackend)
