"""The parsers of forced tool calls (named function, "required"), the "required" schema, and
the parser registry."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pagedllm.entrypoints.openai.tool_parsers import (
    TOOL_PARSERS,
    NamedCallParser,
    RequiredCallsParser,
    ToolParser,
    accumulate,
    get_tool_parser,
    register_tool_parser,
    required_calls_schema,
)
from tests.entrypoints.openai.tool_parsers.helpers import check_stream, pieces, simple, stream

CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"],
    "additionalProperties": False,
}
EMPTY = {"type": "object", "properties": {}}


def test_named_call_is_the_whole_output() -> None:
    p = NamedCallParser("get_weather")
    content, calls = p.extract(' {"city": "a\\"}"}')
    assert content is None and [(c.name, c.arguments) for c in calls] == [
        ("get_weather", '{"city": "a\\"}"}')
    ]
    assert check_stream(p, ' {"city": "a\\"}"}') == (None, [("get_weather", '{"city": "a\\"}"}')])
    # No output at all (max_tokens cut it): one call with empty arguments, streamed or not.
    assert simple(p.extract("")) == (None, [("get_weather", "")])
    assert simple(accumulate(stream(p, []))) == (None, [("get_weather", "")])


def test_required_calls() -> None:
    p = RequiredCallsParser()
    text = (
        '[{"name": "get_weather", "parameters": {"city": "Oslo"}}, '
        '{"name": "noop", "parameters": {}}]'
    )
    assert check_stream(p, text) == (None, [("get_weather", '{"city": "Oslo"}'), ("noop", "{}")])
    # Cut off by max_tokens: the complete calls, and the last one as far as it got.
    cut = text[:70]
    assert simple(p.extract(cut)) == (None, [("get_weather", '{"city": "Oslo"}')])
    assert simple(accumulate(stream(p, pieces(cut, [3, 40])))) == simple(p.extract(cut))


def test_required_schema() -> None:
    schema = required_calls_schema([("get_weather", CITY), ("noop", EMPTY)], parallel=True)
    jsonschema.Draft202012Validator.check_schema(schema)
    ok = [
        [{"name": "get_weather", "parameters": {"city": "Oslo"}}],
        [{"name": "noop", "parameters": {}}, {"name": "get_weather", "parameters": {"city": ""}}],
    ]
    for value in ok:
        jsonschema.validate(value, schema)
    bad = [
        [],
        [{"name": "other", "parameters": {}}],
        [{"name": "get_weather", "parameters": {}}],
        [{"name": "get_weather", "parameters": {"city": "much too long"}}],
        [{"name": "noop"}],
        {"name": "noop", "parameters": {}},
    ]
    for value in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(value, schema)
    single = required_calls_schema([("get_weather", CITY)], parallel=False)
    jsonschema.validate(ok[0], single)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(ok[0] * 2, single)
    assert json.dumps(single["items"]) == json.dumps(
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": ["get_weather"]}, "parameters": CITY},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
    )


def test_required_schema_keeps_local_refs_resolving() -> None:
    pet = {
        "type": "object",
        "properties": {"pet": {"$ref": "#/$defs/Pet"}, "tree": {"$ref": "#"}},
        "required": ["pet"],
        "$defs": {"Pet": {"type": "object", "properties": {"kind": {"enum": ["cat"]}}}},
    }
    original = json.dumps(pet)
    schema = required_calls_schema([("get_weather", CITY), ("adopt", pet)], parallel=True)
    assert json.dumps(pet) == original  # the tool's schema is not modified
    assert schema["items"]["anyOf"][0]["properties"]["parameters"] == CITY  # no refs: inline
    assert schema["$defs"]["tool1"]["properties"]["pet"] == {"$ref": "#/$defs/tool1/$defs/Pet"}
    good = {"pet": {"kind": "cat"}, "tree": {"pet": {"kind": "cat"}}}
    jsonschema.validate([{"name": "adopt", "parameters": good}], schema)
    for bad in ({"pet": {"kind": "dog"}}, {"pet": {"kind": "cat"}, "tree": {"pet": 1}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate([{"name": "adopt", "parameters": bad}], schema)


def test_registry() -> None:
    assert {"hermes", "llama3_json"} <= set(TOOL_PARSERS)
    assert get_tool_parser("hermes").name == "hermes"
    with pytest.raises(ValueError, match="available: .*hermes"):
        get_tool_parser("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_tool_parser("hermes")(ToolParser)  # type: ignore[type-abstract]
