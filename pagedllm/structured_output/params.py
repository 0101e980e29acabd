"""``StructuredOutputsParams``: what a request's output must conform to, spelled as vLLM does.

Exactly one of ``json`` (a JSON schema, as a dict or its text), ``regex``, ``choice`` (a list
of strings), ``grammar`` (Lark, or llama.cpp GBNF) or ``json_object`` (any JSON object) is
set. The options ``disable_any_whitespace`` (compact JSON), ``disable_additional_properties``
(an object schema without ``additionalProperties`` allows no extra keys) and
``whitespace_pattern`` (a regex for the whitespace JSON may contain) shape JSON output only.
This module is plain data: compiling happens in the grammar backend (``backend.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """The constraint of one request (see the module doc)."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        set_kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            got = ", ".join(set_kinds) if set_kinds else "none"
            raise ValueError(
                "structured outputs need exactly one of json, regex, choice, grammar, "
                f"json_object; got {got}."
            )
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except json.JSONDecodeError as e:
                raise ValueError(f"structured outputs: json is not a valid JSON schema: {e}") from e
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise ValueError("structured outputs: json must be a JSON schema (an object).")
        if self.choice is not None and (
            not isinstance(self.choice, list)
            or not self.choice
            or any(not isinstance(c, str) for c in self.choice)
        ):
            raise ValueError("structured outputs: choice must be a non-empty list of strings.")
        for name in ("regex", "grammar", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured outputs: {name} must be a non-empty string.")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> str:
        """A canonical text of the constraint (the compiled-grammar cache key)."""
        body = {k: getattr(self, k) for k in KINDS if getattr(self, k) not in (None, False)}
        body.update(
            disable_any_whitespace=self.disable_any_whitespace,
            disable_additional_properties=self.disable_additional_properties,
            whitespace_pattern=self.whitespace_pattern,
        )
        return json.dumps(body, sort_keys=True, separators=(",", ":"))
