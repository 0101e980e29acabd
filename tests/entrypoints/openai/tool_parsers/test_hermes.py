"""The ``hermes`` parser (Hermes / Qwen2.5 ``<tool_call>`` blocks), whole and streamed with the
text cut at every awkward place: inside the tags, inside JSON strings and escapes."""

from __future__ import annotations

import json

import pytest

from pagedllm.entrypoints.openai.tool_parsers import DeltaMessage, accumulate, get_tool_parser
from tests.entrypoints.openai.tool_parsers.helpers import check_stream, pieces, simple, stream

P = get_tool_parser("hermes")
WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_one_call_after_text() -> None:
    text = "Let me check.\n" + WEATHER
    content, calls = P.extract(text)
    assert content == "Let me check."
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].id.startswith("call_") and len(calls[0].id) == 5 + 24
    assert check_stream(P, text) == ("Let me check.", [("get_weather", '{"city": "Paris"}')])


def test_several_calls_with_tricky_strings() -> None:
    args = {
        "q": 'a </tool_call> b "quoted" {brace} [x] \\ back',
        "uni": "é ✓ 😀",
        "odd": 'say "}" or \\"]',
        "n": [1, {"deep": [True, None, -2.5e3]}],
    }
    text = (
        f'<tool_call>\n{{"name": "search", "arguments": {json.dumps(args)}}}\n</tool_call>\n'
        f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "Oslo"}}}}\n</tool_call>'
    )
    content, calls = check_stream(P, text)
    assert content is None
    assert [n for n, _ in calls] == ["search", "get_weather"]
    assert json.loads(calls[0][1]) == args and json.loads(calls[1][1]) == {"city": "Oslo"}
    ids = [c.id for c in P.extract(text)[1]]
    assert len(set(ids)) == 2


def test_escaped_unicode_name_parameters_key_and_key_order() -> None:
    text = '<tool_call>{"arguments": {"a": 1}, "name": "caf\\u00e9", "extra": [1, "}"]}</tool_call>'
    assert check_stream(P, text) == (None, [("café", '{"a": 1}')])
    text = '<tool_call>{"name": "f", "parameters": {"b": "x"}}</tool_call>'
    assert check_stream(P, text) == (None, [("f", '{"b": "x"}')])
    text = '<tool_call>{"name": "q\\"}", "arguments": {}}</tool_call>'
    assert check_stream(P, text) == (None, [('q"}', "{}")])


def test_no_arguments_is_an_empty_object() -> None:
    assert check_stream(P, '<tool_call>{"name": "ping"}</tool_call>') == (None, [("ping", "{}")])


@pytest.mark.parametrize(
    "text",
    [
        "Just an answer, no tools.",
        "",
        "ends with half a tag <tool_",
        "mentions <tool_call> in prose",
        "<tool_call>not json</tool_call> and more",
        '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
        '<tool_call>{"arguments": {"a": 1}}</tool_call>',  # no name
        '<tool_call>{"name": "f", "arguments": "a string"}</tool_call>',
        '<tool_call>["f"]</tool_call>',
        "  spaces around  \n",
    ],
)
def test_text_without_a_call_stays_content_verbatim(text: str) -> None:
    assert P.extract(text) == (text, [])
    assert check_stream(P, text) == (text or None, [])


def test_text_around_and_between_calls() -> None:
    # Whitespace touching a call block goes; the rest of the text stays, markup never does.
    text = "Before.  \n" + WEATHER + "\n\nbetween\n" + WEATHER + "\n after \n"
    content, calls = check_stream(P, text)
    assert content == "Before.betweenafter \n" and len(calls) == 2
    for cuts in ([5], [12, 13], list(range(1, len(text)))):
        streamed = "".join(m.content for m in stream(P, pieces(text, cuts)))
        assert "<tool_call>" not in streamed and "</tool_call>" not in streamed
        assert streamed == content


def test_a_broken_block_stays_content_next_to_a_call() -> None:
    bad = "<tool_call>oops</tool_call>"
    text = f"  {bad}  {WEATHER}"
    content, calls = check_stream(P, text)
    assert content == f"  {bad}" and calls == [("get_weather", '{"city": "Paris"}')]


def test_unclosed_last_block_and_missing_close_between_blocks() -> None:
    text = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n'
    assert check_stream(P, text) == (None, [("f", '{"x": 1}')])
    text = '<tool_call>{"name": "f", "arguments": {}}<tool_call>{"name": "g", "arguments": {}}'
    assert check_stream(P, text) == (None, [("f", "{}"), ("g", "{}")])
    # Text after the object inside a block is markup: dropped.
    text = '<tool_call>{"name": "f", "arguments": {}} junk</tool_call>tail'
    assert check_stream(P, text) == ("tail", [("f", "{}")])


def test_a_cut_off_call_streams_as_far_as_it_got() -> None:
    # max_tokens can cut a call short: the whole text does not parse, so extract keeps it as
    # content; a stream has already announced the call and sends the arguments it got.
    text = '<tool_call>\n{"name": "f", "arguments": {"city": "Pa'
    assert P.extract(text) == (text, [])
    content, calls = simple(accumulate(stream(P, pieces(text, [20, 40]))))
    assert content is None and calls == [("f", '{"city": "Pa')]
    # Cut before the arguments began: nothing was announced, the text comes back as content.
    text = '<tool_call>\n{"name": "f"'
    assert simple(accumulate(stream(P, [text]))) == (text, [])


def test_streamer_holds_back_only_possible_markup() -> None:
    s = P.streamer()
    assert s.feed("Hello <tool") == DeltaMessage("Hello", [])
    assert s.feed("box> ok") == DeltaMessage(" <toolbox> ok", [])
    header = s.feed(' <tool_call>{"name": "f", "argu')
    assert header == DeltaMessage("", [])  # the trailing space waits for what follows it
    first = s.feed('ments": {"a"')
    assert [(d.index, d.name, d.arguments) for d in first.tool_calls] == [
        (0, "f", ""),
        (0, None, '{"a"'),
    ]
    rest = s.feed(": 1}}</tool_call>")
    assert [d.arguments for d in rest.tool_calls] == [": 1}"] and not rest.content
    assert s.finish() == DeltaMessage()
