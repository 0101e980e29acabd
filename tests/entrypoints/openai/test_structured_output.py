"""Structured output through the server, spelled as clients send it: OpenAI's
``response_format`` (json_object, json_schema), vLLM's ``structured_outputs`` object and its
older ``guided_*`` fields, on chat and text completions, streamed or not, over raw HTTP and
through the official ``openai`` client; and the 400s: a malformed or conflicting constraint
(checked in the API process) and one that does not compile (refused by the engine, which
keeps serving)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.entrypoints.openai.conftest import API_KEY, MODEL_NAME, ServerProc

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PATHS = [CHAT, COMPLETIONS]
COMPACT = {"disable_any_whitespace": True}  # JSON options ride along in structured_outputs
OK_SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}
PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "fish"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "kind", "age"],
    "additionalProperties": False,
}
CHOICES = ["yes", "no", "maybe"]
REGEX = r"(ab|cd)-[0-9]{2,4}"


@pytest.fixture(scope="module")
def http(server: ServerProc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)


def body(path: str, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": MODEL_NAME, "max_tokens": 200, "temperature": 0.0}
    if path == CHAT:
        out["messages"] = [{"role": "user", "content": "Answer in JSON."}]
    else:
        out["prompt"] = "The answer is"
    out.update(fields)
    return out


def generate(http: httpx.Client, path: str, **fields: Any) -> tuple[str, str]:
    """The one choice's text and finish reason."""
    r = http.post(path, json=body(path, **fields))
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    text = choice["message"]["content"] if path == CHAT else choice["text"]
    return text, choice["finish_reason"]


def error(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == "invalid_request_error"
    return dict(err)


def still_serves(http: httpx.Client) -> None:
    text, finish = generate(http, COMPLETIONS, max_tokens=4)
    assert finish in ("stop", "length")
    text, _ = generate(http, CHAT, structured_outputs={"choice": CHOICES})
    assert text in CHOICES


# ---- each spelling, chat and completions ---------------------------------------------------
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("extra", [{}, {"structured_outputs": COMPACT}], ids=["spaces", "compact"])
def test_response_format_json_object(http: httpx.Client, path: str, extra: dict[str, Any]) -> None:
    text, finish = generate(http, path, response_format={"type": "json_object"}, **extra)
    assert finish == "stop", text
    assert isinstance(json.loads(text), dict)
    if extra:
        assert not re.search(r"[\n\r\t]", text), text  # compact: no layout whitespace


@pytest.mark.parametrize("path", PATHS)
def test_response_format_json_schema(http: httpx.Client, path: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA}}
    text, finish = generate(http, path, response_format=fmt, structured_outputs=COMPACT)
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), PET_SCHEMA)
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "ok", "schema": OK_SCHEMA, "strict": True, "description": "d"},
    }
    text, finish = generate(http, path, response_format=fmt)
    if finish == "stop":  # free whitespace: the tiny model may not close it within max_tokens
        jsonschema.validate(json.loads(text), OK_SCHEMA)
    else:
        assert finish == "length" and text.startswith("{"), text


@pytest.mark.parametrize("path", PATHS)
def test_structured_outputs_object(http: httpx.Client, path: str) -> None:
    text, finish = generate(http, path, structured_outputs={"regex": REGEX})
    assert re.fullmatch(REGEX, text) and finish == "stop", text
    text, finish = generate(http, path, structured_outputs={"choice": CHOICES})
    assert text in CHOICES and finish == "stop"
    so = {"json": PET_SCHEMA, **COMPACT}
    text, _ = generate(http, path, structured_outputs=so)
    jsonschema.validate(json.loads(text), PET_SCHEMA)
    so = {"json": json.dumps(PET_SCHEMA), "disable_fallback": False, **COMPACT}  # (JSON text)
    text, _ = generate(http, path, structured_outputs=so)
    jsonschema.validate(json.loads(text), PET_SCHEMA)
    # The options reach the engine: an open object may have two properties, a closed one not.
    two = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "minProperties": 2,
    }
    text, _ = generate(http, path, max_tokens=8, structured_outputs={"json": two, **COMPACT})
    assert text.startswith('{"'), text
    so = {"json": two, "disable_additional_properties": True, **COMPACT}
    err = error(http.post(path, json=body(path, structured_outputs=so)))
    assert err["param"] == "structured_outputs" and "Unsatisfiable" in err["message"], err
    text, _ = generate(http, path, structured_outputs={"grammar": 'start: "yes" | "no"'})
    assert text in ("yes", "no")
    text, _ = generate(http, path, structured_outputs={"json_object": True, **COMPACT})
    assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("path", PATHS)
def test_guided_fields(http: httpx.Client, path: str) -> None:
    text, _ = generate(http, path, guided_choice=CHOICES)
    assert text in CHOICES
    text, _ = generate(http, path, guided_regex=REGEX, guided_decoding_backend="auto")
    assert re.fullmatch(REGEX, text), text
    text, _ = generate(http, path, guided_grammar='start: "yes" | "no"')
    assert text in ("yes", "no")
    # A JSON schema as an object or as its text; the whitespace pattern keeps it on one line.
    for schema in (PET_SCHEMA, json.dumps(PET_SCHEMA)):
        text, finish = generate(
            http,
            path,
            guided_json=schema,
            guided_whitespace_pattern=" ?",
            guided_decoding_backend="llguidance",
        )
        assert finish == "stop" and "\n" not in text, text
        jsonschema.validate(json.loads(text), PET_SCHEMA)


def test_constraint_holds_for_every_choice(http: httpx.Client) -> None:
    r = http.post(
        COMPLETIONS,
        json=body(COMPLETIONS, prompt=["a", "b"], n=3, temperature=1.0, seed=7, guided_regex=REGEX),
    )
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["choices"]]
    assert len(texts) == 6 and all(re.fullmatch(REGEX, t) for t in texts), texts


@pytest.mark.parametrize("path", PATHS)
def test_streaming_with_a_choice(http: httpx.Client, path: str) -> None:
    fields = body(path, stream=True, structured_outputs={"choice": ["alpha beta", "gamma"]})
    with http.stream("POST", path, json=fields) as r:
        assert r.status_code == 200
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    key = (lambda c: c["delta"].get("content") or "") if path == CHAT else (lambda c: c["text"])
    assert "".join(key(c) for c in choices) in ("alpha beta", "gamma")
    assert choices[-1]["finish_reason"] == "stop"


def test_text_format_and_tool_choice_none_change_nothing(http: httpx.Client) -> None:
    plain, _ = generate(http, CHAT, max_tokens=8)
    text, _ = generate(
        http, CHAT, max_tokens=8, response_format={"type": "text"}, tool_choice="none"
    )
    assert text == plain
    text, _ = generate(http, CHAT, max_tokens=8, response_format=None, guided_choice=None)
    assert text == plain


# ---- the official client ---------------------------------------------------------------
def test_openai_client(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "A pet, please."}]
    fmt: Any = {
        "type": "json_schema",
        "json_schema": {"name": "pet", "schema": PET_SCHEMA, "strict": True},
    }
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        temperature=0,
        max_tokens=200,
        response_format=fmt,
        extra_body={"structured_outputs": COMPACT},
    )
    content = r.choices[0].message.content
    assert content is not None and r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(content), PET_SCHEMA)

    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=50,
        extra_body={"structured_outputs": {"regex": REGEX}},
    )
    assert re.fullmatch(REGEX, r.choices[0].message.content or "")

    c = client.completions.create(
        model=MODEL_NAME, prompt="Well,", max_tokens=50, extra_body={"guided_choice": CHOICES}
    )
    assert c.choices[0].text in CHOICES

    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=50,
        stream=True,
        extra_body={"guided_choice": CHOICES},
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) in CHOICES

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            response_format={"type": "json_schema", "json_schema": {"name": "bad"}},
        )
    assert info.value.body["param"] == "response_format.json_schema.schema"  # type: ignore[index]


# ---- 400s ------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    ("path", "fields", "param", "words"),
    [
        (CHAT, {"structured_outputs": {"regex": "a(b"}}, "structured_outputs", "unclosed group"),
        (COMPLETIONS, {"guided_regex": "[z-a]"}, "guided_regex", "invalid regex"),
        (
            CHAT,
            {"response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "nonsense"}}}},
            "response_format",
            "nonsense",
        ),
        (COMPLETIONS, {"guided_json": {"type": "nonsense"}}, "guided_json", "nonsense"),
        (CHAT, {"guided_grammar": "start: foo"}, "guided_grammar", "unknown name"),
        (
            COMPLETIONS,
            {"structured_outputs": {"json_object": True, "whitespace_pattern": "("}},
            "structured_outputs",
            "unclosed group",
        ),
    ],
)  # fmt: skip
def test_constraint_that_does_not_compile_is_400(
    http: httpx.Client, path: str, fields: dict[str, Any], param: str, words: str, stream: bool
) -> None:
    """The engine refuses it (the API process has no grammar backend): a 400 with the
    library's message, before any stream starts, and the engine serves on."""
    err = error(http.post(path, json=body(path, stream=stream, **fields)))
    assert err["param"] == param and "structured outputs" in err["message"], err
    assert words in err["message"], err
    still_serves(http)


def test_constraint_that_does_not_compile_with_several_prompts(http: httpx.Client) -> None:
    fields = body(COMPLETIONS, prompt=["a", "b", "c"], guided_regex="(")
    err = error(http.post(COMPLETIONS, json=fields))
    assert err["param"] == "guided_regex"
    still_serves(http)


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        (  # two spellings at once: the second is named, the message names both
            {"response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": OK_SCHEMA}}, "guided_regex": "a+"},
            "guided_regex",
            ["response_format", "guided_regex"],
        ),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
            ["response_format", "structured_outputs"],
        ),
        ({"guided_json": OK_SCHEMA, "guided_choice": ["a"]}, "guided_choice", ["guided_json"]),
        (
            {"structured_outputs": {"regex": "a+", "choice": ["a"]}},
            "structured_outputs",
            ["structured_outputs.regex", "structured_outputs.choice"],
        ),
        ({"structured_outputs": {}}, "structured_outputs", ["exactly one"]),
        ({"structured_outputs": COMPACT}, "structured_outputs", ["exactly one"]),
        ({"guided_choice": ["a"], "guided_decoding_backend": "xgrammar"},
         "guided_decoding_backend", ["xgrammar"]),
        ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend", ["outlines"]),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format.json_schema.schema",
            ["response_format.json_schema.schema"],
        ),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema",
         ["json_schema"]),
        (
            {"response_format": {"type": "json_object", "json_schema": {
                "name": "x", "schema": OK_SCHEMA}}},
            "response_format.json_schema",
            ["json_schema"],
        ),
        ({"structured_outputs": {"choice": ["a"], "structural_tag": "t"}},
         "structured_outputs.structural_tag", ["structural_tag"]),
        ({"response_format": {"type": "json_object", "extra": 1}},
         "response_format.extra", ["extra"]),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": OK_SCHEMA, "format": "y"}}},
         "response_format.json_schema.format", ["format"]),
        ({"guided_json": "{not json"}, "guided_json", ["not a valid JSON schema"]),
        ({"guided_json": "[1]"}, "guided_json", ["JSON schema"]),
        ({"structured_outputs": {"regex": ""}}, "structured_outputs", ["regex"]),
        ({"guided_whitespace_pattern": " ", "structured_outputs": {
            "json_object": True, "whitespace_pattern": "\t"}},
         "guided_whitespace_pattern", ["differ"]),
        # strict types, as everywhere in the API
        ({"response_format": {"type": "xml"}}, "response_format", ["type"]),
        ({"response_format": "json_object"}, "response_format", ["response_format"]),
        ({"guided_choice": "yes"}, "guided_choice", ["guided_choice"]),
        ({"guided_choice": ["a", 1]}, "guided_choice", ["guided_choice"]),
        ({"structured_outputs": {"json_object": 1}}, "structured_outputs", ["json_object"]),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": "{}"}}}, "response_format", ["schema"]),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "schema": OK_SCHEMA}}}, "response_format", ["name"]),
    ],
)  # fmt: skip
@pytest.mark.parametrize("path", PATHS)
def test_malformed_constraints_are_400(
    http: httpx.Client, path: str, fields: dict[str, Any], param: str, words: list[str]
) -> None:
    err = error(http.post(path, json=body(path, **fields)))
    assert err["param"] == param, err
    assert all(w in err["message"] for w in words), err


def test_tool_calls_and_a_constraint_are_400(http: httpx.Client) -> None:
    # Tools without tool_choice mean "auto", which constrains the output its own way.
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    err = error(http.post(CHAT, json=body(CHAT, tools=tools, guided_choice=["a"])))
    assert err["param"] == "guided_choice" and "tool_choice" in err["message"], err
    # tool_choice "none": the tools only reach the template, the constraint holds.
    text, _ = generate(http, CHAT, tools=tools, tool_choice="none", guided_choice=["a", "b"])
    assert text in ("a", "b")
    still_serves(http)
