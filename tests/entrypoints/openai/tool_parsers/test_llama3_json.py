"""The ``llama3_json`` parser (Llama 3.1 JSON calls, ``;``-separated, optional
``<|python_tag|>``), whole and streamed with the text cut at every awkward place."""

from __future__ import annotations

import json

import pytest

from pagedllm.entrypoints.openai.tool_parsers import accumulate, get_tool_parser
from tests.entrypoints.openai.tool_parsers.helpers import check_stream, pieces, simple, stream

P = get_tool_parser("llama3_json")
CALL = '{"name": "get_weather", "parameters": {"city": "Paris"}}'


def test_one_call() -> None:
    content, calls = P.extract(CALL)
    assert content is None and len(calls) == 1
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert check_stream(P, CALL) == (None, [("get_weather", '{"city": "Paris"}')])


def test_python_tag_and_several_calls() -> None:
    args = {"q": 'semi; colon } brace "q" \\', "list": [1, [2, {"x": "]"}]], "e": '"}'}
    text = (
        f'<|python_tag|>{{"name": "search", "parameters": {json.dumps(args)}}}; '
        '{"name": "f", "arguments": {}};\n{"parameters": {"b": 2}, "name": "g"}'
    )
    content, calls = check_stream(P, text)
    assert content is None and [n for n, _ in calls] == ["search", "f", "g"]
    assert json.loads(calls[0][1]) == args and calls[1][1] == "{}" and calls[2][1] == '{"b": 2}'


def test_leading_whitespace_and_missing_parameters() -> None:
    assert check_stream(P, '\n\n {"name": "ping"}\n') == (None, [("ping", "{}")])


@pytest.mark.parametrize(
    "text",
    [
        "The weather is fine.",
        "",
        "  \n",
        "<|python_tag|>",
        "<|python_tag|>print('hi')",
        'Answer: {"name": "f", "parameters": {}}',  # a call that does not start the output
        '{"answer": 42}',  # an object, but not a call
        '{"name": "f", "parameters": [1, 2]}',
        '{"name": "f", "parameters": {"a": 1}',  # never closed
    ],
)
def test_output_that_is_not_a_call_stays_content_verbatim(text: str) -> None:
    assert P.extract(text) == (text, [])
    if text != '{"name": "f", "parameters": {"a": 1}':  # (streamed: see the cut-off test)
        assert check_stream(P, text) == (text or None, [])


def test_text_after_the_calls_is_content() -> None:
    assert check_stream(P, CALL + " and then some text") == (
        "and then some text",
        [("get_weather", '{"city": "Paris"}')],
    )
    assert check_stream(P, CALL + "; not a call") == (
        "not a call",
        [("get_weather", '{"city": "Paris"}')],
    )
    # A broken second object: content from its first character.
    assert check_stream(P, CALL + '; {"name": 1}') == (
        '{"name": 1}',
        [("get_weather", '{"city": "Paris"}')],
    )
    assert check_stream(P, CALL + ";  \n") == (None, [("get_weather", '{"city": "Paris"}')])


def test_a_cut_off_call_streams_as_far_as_it_got() -> None:
    text = '{"name": "f", "parameters": {"a": 1'
    assert P.extract(text) == (text, [])
    assert simple(accumulate(stream(P, pieces(text, [10, 30])))) == (None, [("f", '{"a": 1')])
