"""Tool calling on ``/v1/chat/completions``, spelled as OpenAI and vLLM spell it.

``plan_tools`` checks a request's ``tools`` / ``tool_choice`` / ``parallel_tool_calls`` and
decides how its output becomes tool calls:

* ``"none"`` (the default without tools): the tools still reach the chat template, the output
  is content;
* a named function (``{"type": "function", "function": {"name": ...}}``): the output is
  constrained to the function's parameters schema and is the arguments of one call (forced
  JSON is on one line, with at most single spaces: ``FORCED_WHITESPACE``);
* ``"required"``: the output is constrained to a JSON array of one or more
  ``{"name", "parameters"}`` objects, one ``anyOf`` branch per tool (at most one call when
  ``parallel_tool_calls`` is false);
* ``"auto"`` (the default with tools, as in vLLM): only on a server started with
  ``--enable-auto-tool-choice --tool-call-parser NAME``; the model's own markup is parsed after
  (or while) it generates; with ``parallel_tool_calls: false`` only its first call is kept.

A forced choice or ``"auto"`` cannot be combined with another constraint (``response_format``,
``structured_outputs``, ``guided_*``): 400. A choice with calls that ended normally finishes
with ``finish_reason: "tool_calls"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagedllm.entrypoints.openai.errors import bad_request
from pagedllm.entrypoints.openai.protocol import ChatCompletionRequest, ChatTool
from pagedllm.entrypoints.openai.server_state import ServerState, check_unicode
from pagedllm.entrypoints.openai.structured_outputs import Constraint
from pagedllm.entrypoints.openai.tool_parsers import (
    DeltaMessage,
    NamedCallParser,
    RequiredCallsParser,
    ToolCall,
    ToolCallStreamer,
    ToolParser,
    get_tool_parser,
    required_calls_schema,
)
from pagedllm.structured_output.params import StructuredOutputsParams

MAX_TOOLS = 128
FORCED_WHITESPACE = " ?"  # the JSON whitespace of forced calls
MAX_TOOL_NAME_CHARS = 64
_COMPOSED = ("anyOf", "oneOf", "allOf", "$ref", "not", "if", "enum", "const")


def check_tools(tools: list[ChatTool] | None) -> list[dict[str, Any]] | None:
    """400 for tool definitions we cannot use; the tools as chat-template dicts."""
    if not tools:
        return None
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"At most {MAX_TOOLS} tools are allowed, got {len(tools)}.", "tools")
    names: set[str] = set()
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        fn = tool.function
        where = f"tools[{i}].function"
        if not fn.name or len(fn.name) > MAX_TOOL_NAME_CHARS or any(c.isspace() for c in fn.name):
            raise bad_request(
                f"{where}.name must be 1 to {MAX_TOOL_NAME_CHARS} characters without "
                f"whitespace, got {fn.name!r}.",
                f"{where}.name",
            )
        if fn.name in names:
            raise bad_request(f"Two tools are named {fn.name!r}; names must be unique.", "tools")
        names.add(fn.name)
        params = fn.parameters
        if params is not None and params.get("type", "object") != "object":
            raise bad_request(
                f"{where}.parameters must be the JSON schema of an object (the arguments), "
                f"not of type {params.get('type')!r}.",
                f"{where}.parameters",
            )
        d = tool.model_dump(exclude_none=True, by_alias=True)
        check_unicode(json.dumps(d, ensure_ascii=False), "tools")
        out.append(d)
    return out


def _arguments_schema(params: dict[str, Any] | None) -> dict[str, Any]:
    """A function's parameters as the schema of an object (no parameters: ``{}``, as OpenAI
    reads a function without ``parameters``)."""
    if params is None:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    if "type" not in params and not any(k in params for k in _COMPOSED):
        return {**params, "type": "object"}
    return params


@dataclass
class ToolPlan:
    """How one request's output becomes content and tool calls (see the module doc)."""

    mode: str  # "none", "auto", "named" or "required"
    tools: list[dict[str, Any]] | None = None  # for the chat template
    constraint: Constraint | None = None
    parser: ToolParser | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        return self.mode in ("named", "required")

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """A finished choice's content and calls."""
        if self.parser is None:
            return text, []
        content, calls = self.parser.extract(text)
        return content, calls if self.parallel else calls[:1]

    def streamer(self) -> ToolCallStreamer | None:
        return None if self.parser is None else self.parser.streamer()

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        return "tool_calls" if called and reason == "stop" else reason


def plan_tools(
    req: ChatCompletionRequest, constraint: Constraint | None, state: ServerState
) -> ToolPlan:
    """The request's ``ToolPlan``; a 400 naming the field for what cannot be honoured."""
    tools = check_tools(req.tools)
    choice = req.tool_choice
    implicit = choice is None
    if choice is None:
        choice = "auto" if tools else "none"
    parallel = req.parallel_tool_calls is not False
    if choice == "none":
        return ToolPlan("none", tools)
    label = f"tool_choice {choice!r}" if isinstance(choice, str) else "a named tool_choice"
    if not tools or not req.tools:
        raise bad_request(f"{label} needs tools: give the functions in 'tools'.", "tool_choice")
    if constraint is not None:
        raise bad_request(
            f"{constraint.field} cannot be combined with {label}"
            + (" (the default when tools are given)" if implicit else "")
            + ": tool calls constrain the output themselves. Remove one of them.",
            constraint.field,
        )
    if choice == "auto":
        if not state.enable_auto_tool_choice or state.tool_call_parser is None:
            raise bad_request(
                '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser '
                "to be set"
                + (" (tool_choice defaults to 'auto' when tools are given)" if implicit else "")
                + ". Use tool_choice 'required' or a named function to force a call, or 'none'.",
                "tool_choice",
            )
        return ToolPlan("auto", tools, None, get_tool_parser(state.tool_call_parser), parallel)
    functions = {t.function.name: t.function.parameters for t in req.tools}
    if choice == "required":
        pairs = [(name, _arguments_schema(p)) for name, p in functions.items()]
        schema = required_calls_schema(pairs, parallel)
        return ToolPlan("required", tools, _constraint(schema), RequiredCallsParser(), parallel)
    assert not isinstance(choice, str)
    name = choice.function.name
    if name not in functions:
        raise bad_request(
            f"tool_choice names the function {name!r}, which is not in tools "
            f"({', '.join(repr(n) for n in functions)}).",
            "tool_choice",
        )
    schema = _arguments_schema(functions[name])
    return ToolPlan("named", tools, _constraint(schema), NamedCallParser(name), parallel)


def _constraint(schema: dict[str, Any]) -> Constraint:
    """The engine's constraint for a forced choice (compile errors name ``tools``): JSON on one
    line, at most one space where JSON allows whitespace (``{"city": "Paris"}``), so that a
    model cannot wander off in whitespace."""
    try:
        params = StructuredOutputsParams(json=schema, whitespace_pattern=FORCED_WHITESPACE)
        return Constraint(params, "tools")
    except ValueError as e:
        raise bad_request(str(e), "tools") from e


def delta_dicts(msg: DeltaMessage, parallel: bool) -> list[dict[str, Any]]:
    """A streamer's output as chunk deltas, in order: content first, then tool-call pieces; a
    call's index appears once per delta (clients that keep the first list of a chunk as it is
    would otherwise see one call twice), so its header and first fragment go in two. Calls
    after the first are dropped when ``parallel`` is false."""
    out: list[dict[str, Any]] = []
    if msg.content:
        out.append({"content": msg.content})
    current: list[dict[str, Any]] = []
    for d in msg.tool_calls:
        if not parallel and d.index > 0:
            continue
        if any(c["index"] == d.index for c in current):
            out.append({"tool_calls": current})
            current = []
        current.append(d.to_openai())
    if current:
        out.append({"tool_calls": current})
    return out
