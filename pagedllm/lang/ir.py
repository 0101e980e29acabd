"""The expressions a program appends to its state: text, ``gen``, ``select`` and role blocks.

``s += expr`` hands an expression to the state, which runs it in order. Expressions are plain
data: what they mean is decided by the interpreter (``state.py``), so the same program runs on
every backend. ``+`` concatenates expressions (``user("Q: " + question)``,
``assistant(gen("a") + "\n")``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")
SelectMethod = Literal["token_length_normalized", "greedy", "unconditional_normalized"]
SELECT_METHODS: tuple[str, ...] = ("token_length_normalized", "greedy", "unconditional_normalized")


class Expr:
    """Base of everything ``s += ...`` accepts besides ``str``."""

    def __add__(self, other: Expr | str) -> Concat:
        return Concat([self, as_expr(other)])

    def __radd__(self, other: Expr | str) -> Concat:
        return Concat([as_expr(other), self])


@dataclass
class Text(Expr):
    text: str


@dataclass
class Concat(Expr):
    parts: list[Expr]


@dataclass
class GenParams:
    """Sampling options of one ``gen``; ``None`` takes the program's default (``run(...)``)."""

    max_tokens: int | None = None
    min_tokens: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    ignore_eos: bool | None = None
    regex: str | None = None
    json_schema: str | None = None

    def merged(self, defaults: GenParams) -> GenParams:
        """These options, with every unset one taken from ``defaults``."""
        values = {
            f.name: getattr(self, f.name)
            if getattr(self, f.name) is not None
            else getattr(defaults, f.name)
            for f in dataclasses.fields(self)
        }
        return GenParams(**values)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


DEFAULT_GEN_PARAMS = GenParams(
    max_tokens=128,
    min_tokens=0,
    temperature=1.0,
    top_p=1.0,
    top_k=-1,
    min_p=0.0,
    frequency_penalty=0.0,
    presence_penalty=0.0,
    ignore_eos=False,
)


@dataclass
class Gen(Expr):
    name: str | None
    params: GenParams = field(default_factory=GenParams)


@dataclass
class Select(Expr):
    name: str | None
    choices: list[str]
    method: SelectMethod = "token_length_normalized"


@dataclass
class RoleBegin(Expr):
    role: Role


@dataclass
class RoleEnd(Expr):
    role: Role


def as_expr(value: Any) -> Expr:
    if isinstance(value, Expr):
        return value
    if isinstance(value, str):
        return Text(value)
    raise TypeError(f"A program can append str or lang expressions, not {type(value).__name__}.")


def gen(
    name: str | None = None,
    max_tokens: int | None = None,
    stop: str | list[str] | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    frequency_penalty: float | None = None,
    presence_penalty: float | None = None,
    ignore_eos: bool | None = None,
    min_tokens: int | None = None,
    stop_token_ids: list[int] | None = None,
    regex: str | None = None,
    json_schema: str | dict[str, Any] | None = None,
    choices: list[str] | None = None,
    choices_method: SelectMethod = "token_length_normalized",
) -> Gen | Select:
    """Generate text at this point of the program (stored as ``state[name]``); with
    ``choices``, pick one of them instead (``select``)."""
    if choices is not None:
        return select(name, choices, choices_method)
    if isinstance(json_schema, dict):
        import json

        json_schema = json.dumps(json_schema)
    params = GenParams(
        max_tokens=max_tokens,
        min_tokens=min_tokens,
        stop=stop,
        stop_token_ids=stop_token_ids,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
        ignore_eos=ignore_eos,
        regex=regex,
        json_schema=json_schema,
    )
    return Gen(name, params)


def select(
    name: str | None = None,
    choices: list[str] | None = None,
    choices_method: SelectMethod = "token_length_normalized",
) -> Select:
    """Append the choice the model finds most likely here (stored as ``state[name]``).

    ``choices_method``: ``"token_length_normalized"`` (the mean logprob of the choice's
    tokens), ``"greedy"`` (the highest first-token logprob, ties broken by the next tokens) or
    ``"unconditional_normalized"`` (the mean of each token's logprob minus its logprob without
    the program's text before it).
    """
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("select needs a non-empty list of non-empty strings as choices.")
    if choices_method not in SELECT_METHODS:
        raise ValueError(f"choices_method must be one of {', '.join(SELECT_METHODS)}.")
    return Select(name, list(choices), choices_method)


def _role(role: Role, content: Expr | str | None) -> Expr:
    if content is None:
        return RoleBegin(role)  # used as ``with s.user():`` is more usual; see ProgramState
    return Concat([RoleBegin(role), as_expr(content), RoleEnd(role)])


def system(content: Expr | str) -> Expr:
    return _role("system", content)


def user(content: Expr | str) -> Expr:
    return _role("user", content)


def assistant(content: Expr | str) -> Expr:
    return _role("assistant", content)


def system_begin() -> RoleBegin:
    return RoleBegin("system")


def system_end() -> RoleEnd:
    return RoleEnd("system")


def user_begin() -> RoleBegin:
    return RoleBegin("user")


def user_end() -> RoleEnd:
    return RoleEnd("user")


def assistant_begin() -> RoleBegin:
    return RoleBegin("assistant")


def assistant_end() -> RoleEnd:
    return RoleEnd("assistant")
