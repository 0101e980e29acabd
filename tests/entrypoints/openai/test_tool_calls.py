"""Tool calling on ``/v1/chat/completions`` with the tiny random model.

A random model never writes tool-call markup by itself, so what is covered end to end is:
forced calls (a named function, ``"required"``: the grammar makes the arguments parse, and
they must validate against the tool's schema), streamed or not, over raw HTTP and through the
official ``openai`` client; ``"none"``; the 400s (and the server serving on after each);
``"auto"`` refused without ``--enable-auto-tool-choice`` and, on a server started with it,
answering well-formed responses whose content is the plain output when it holds no call; and
tools, assistant ``tool_calls`` and ``tool`` messages reaching the chat template. Parsing real
tool-call markup is unit-tested in ``tool_parsers/``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.entrypoints.openai.conftest import API_KEY, MODEL_NAME, ServerProc, launch

CHAT = "/v1/chat/completions"
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}},
    "required": ["city"],
    "additionalProperties": False,
}
CONVERT = {
    "type": "object",
    "properties": {
        "value": {"type": "integer", "minimum": 0, "maximum": 999},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["value", "unit"],
    "additionalProperties": False,
}
PET = {  # nested models as pydantic writes them: $defs and local $refs
    "type": "object",
    "properties": {"pet": {"$ref": "#/$defs/Pet"}},
    "required": ["pet"],
    "additionalProperties": False,
    "$defs": {
        "Pet": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 6}, "kind": {"enum": ["cat"]}},
            "required": ["name", "kind"],
            "additionalProperties": False,
        }
    },
}
SCHEMAS = {
    "get_weather": CITY,
    "convert": CONVERT,
    "adopt": PET,
    "ping": {"type": "object", "maxProperties": 0},
}


def tool(name: str, params: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": name, "description": f"the {name} function", **extra}
    if params is not None:
        fn["parameters"] = params
    return {"type": "function", "function": fn}


TOOLS = [tool("get_weather", CITY), tool("convert", CONVERT), tool("ping")]
WEATHER = {"type": "function", "function": {"name": "get_weather"}}
# A tool-aware template: tools, assistant tool calls (arguments as objects) and tool results.
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>\nTools:{% for t in tools %} "
    "{{ t.function.name }}{% endfor %}<|end|>\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>\n{% for c in m.tool_calls or [] %}"
    "<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}</tool_call>"
    "{% endfor %}{{ m.content }}{% if m.tool_call_id %} [{{ m.tool_call_id }}]{% endif %}"
    "<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def http(server: ServerProc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def client(server: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def tool_http(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """A server with ``--enable-auto-tool-choice --tool-call-parser hermes`` and the
    tool-aware template."""
    tmp = tmp_path_factory.mktemp("tool_server")
    template = tmp / "template.jinja"
    template.write_text(TOOL_TEMPLATE)
    flags = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    server = launch("tools", llama_dir, tmp, *flags, "--chat-template", str(template))
    try:
        server.wait_ready(time.monotonic() + 120)
        with httpx.Client(base_url=server.base_url, timeout=60) as c:
            yield c
    finally:
        server.terminate()
        server.wait_stopped()


def body(**fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": TOOLS,
        "max_tokens": 120,
        "temperature": 0.0,
    }
    out.update(fields)
    return out


def chat(http: httpx.Client, **fields: Any) -> list[dict[str, Any]]:
    r = http.post(CHAT, json=body(**fields))
    assert r.status_code == 200, r.text
    return list(r.json()["choices"])


def streamed(http: httpx.Client, **fields: Any) -> dict[int, dict[str, Any]]:
    """Chunks accumulated per choice as a client does it, checking OpenAI's delta shape."""
    with http.stream("POST", CHAT, json=body(stream=True, **fields)) as r:
        assert r.status_code == 200, r.read()
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    out: dict[int, dict[str, Any]] = {}
    for line in lines[:-1]:
        for ch in json.loads(line.removeprefix("data: "))["choices"]:
            acc = out.setdefault(ch["index"], {"content": None, "tool_calls": []})
            delta = ch["delta"]
            if delta.get("content") is not None:
                acc["content"] = (acc["content"] or "") + delta["content"]
            indices = [d["index"] for d in delta.get("tool_calls", [])]
            assert len(indices) == len(set(indices)), delta  # one piece per call and delta
            for d in delta.get("tool_calls", []):
                calls = acc["tool_calls"]
                if d["index"] == len(calls):  # a new call: index, id, type, name, ""
                    assert d["id"].startswith("call_") and d["type"] == "function", d
                    assert d["function"]["arguments"] == "" and d["function"]["name"], d
                    calls.append({"id": d["id"], "type": "function", "function": d["function"]})
                else:
                    assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
                    calls[d["index"]]["function"]["arguments"] += d["function"]["arguments"]
            if ch["finish_reason"] is not None:
                acc["finish_reason"] = ch["finish_reason"]
    return out


def calls_of(message: dict[str, Any]) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]


def check_call(call: dict[str, Any]) -> None:
    """A well-formed call whose arguments validate against its tool's parameters."""
    assert call["type"] == "function" and call["id"].startswith("call_") and len(call["id"]) == 29
    int(call["id"][5:], 16)
    args = json.loads(call["function"]["arguments"])
    jsonschema.validate(args, SCHEMAS[call["function"]["name"]])


def error(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    return dict(err)


def still_serves(http: httpx.Client) -> None:
    choices = chat(http, tools=None, max_tokens=4)
    assert choices[0]["finish_reason"] in ("stop", "length")


# ---- forced calls --------------------------------------------------------------------------
def test_named_tool_choice(http: httpx.Client) -> None:
    choices = chat(http, tool_choice=WEATHER, n=3, temperature=1.0, seed=11)
    ids = set()
    for c in choices:
        msg = c["message"]
        assert msg["content"] is None and c["finish_reason"] == "tool_calls", c
        assert len(msg["tool_calls"]) == 1 and msg["tool_calls"][0]["function"]["name"] == (
            "get_weather"
        )
        check_call(msg["tool_calls"][0])
        ids.add(msg["tool_calls"][0]["id"])
    assert len(ids) == 3
    (c,) = chat(http, tool_choice={"type": "function", "function": {"name": "ping"}})
    ((name, args),) = calls_of(c["message"])
    assert name == "ping" and json.loads(args) == {} and c["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("choice", [WEATHER, "required"])
def test_streaming_adds_up_to_the_response(http: httpx.Client, choice: Any) -> None:
    fields = {"tool_choice": choice, "n": 2, "temperature": 1.0, "seed": 5}
    whole = chat(http, **fields)
    parts = streamed(http, **fields)
    assert sorted(parts) == [0, 1]
    for c in whole:
        acc = parts[c["index"]]
        assert acc["content"] is None and acc["finish_reason"] == c["finish_reason"]
        assert calls_of(acc) == calls_of(c["message"]) and calls_of(acc)
        for call in acc["tool_calls"]:
            check_call(call)


def test_required_one_call(http: httpx.Client) -> None:
    tools = [tool("get_weather", CITY), tool("convert", CONVERT), tool("adopt", PET)]
    for seed in range(3):
        choices = chat(
            http,
            tools=tools,
            tool_choice="required",
            parallel_tool_calls=False,
            n=3,
            temperature=1.0,
            seed=seed,
        )
        for c in choices:
            assert c["finish_reason"] == "tool_calls" and c["message"]["content"] is None, c
            (call,) = c["message"]["tool_calls"]
            check_call(call)


def test_required_parallel_calls(http: httpx.Client) -> None:
    choices = chat(http, tool_choice="required", n=4, temperature=1.0, seed=3, max_tokens=250)
    for c in choices:
        calls = c["message"]["tool_calls"]
        assert calls and c["message"]["content"] is None
        complete = calls if c["finish_reason"] == "tool_calls" else calls[:-1]
        assert c["finish_reason"] in ("tool_calls", "length")
        for call in complete:
            check_call(call)
        assert len({call["id"] for call in calls}) == len(calls)


def test_openai_client_named_and_streamed(client: openai.OpenAI) -> None:
    tools: Any = [tool("get_weather", CITY, strict=True)]
    kw: dict[str, Any] = dict(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        tools=tools,
        tool_choice=WEATHER,
        temperature=0.0,
        max_tokens=60,
    )
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    assert msg.tool_calls is not None and len(msg.tool_calls) == 1
    call: Any = msg.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), CITY)
    with client.chat.completions.stream(**kw) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    fmsg: Any = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls" and not fmsg.content
    (fcall,) = fmsg.tool_calls
    assert (fcall.function.name, fcall.function.arguments) == (
        "get_weather",
        call.function.arguments,
    )
    assert fcall.function.parsed_arguments == json.loads(call.function.arguments)
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_generates_text(http: httpx.Client) -> None:
    plain = chat(http, tools=None, max_tokens=8)[0]
    (c,) = chat(http, tool_choice="none", max_tokens=8)
    # This model's template ignores tools: the prompt, so the greedy output, is the same.
    assert c["message"]["content"] == plain["message"]["content"]
    assert c["message"]["tool_calls"] == [] and c["finish_reason"] == plain["finish_reason"]


# ---- 400s ----------------------------------------------------------------------------------
BAD = [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [], "tool_choice": WEATHER}, "tool_choice", "needs tools"),
    ({"tool_choice": "auto"}, "tool_choice", "--enable-auto-tool-choice"),
    ({}, "tool_choice", "--enable-auto-tool-choice"),  # tools given: "auto" by default
    ({"tools": [{"type": "function", "function": {}}]}, "tools", "name"),
    ({"tools": [{"type": "custom", "function": {"name": "f"}}]}, "tools", "function"),
    ({"tools": [{"function": {"name": "f"}}]}, "tools", "type"),
    ({"tools": [tool("f", "not a schema")]}, "tools", "parameters"),  # type: ignore[arg-type]
    ({"tools": [tool("f", {"type": "string"})], "tool_choice": "none"},
     "tools[0].function.parameters", "object"),
    ({"tools": [tool("f"), tool("f")], "tool_choice": "none"}, "tools", "unique"),
    ({"tools": [tool("has space")], "tool_choice": "none"}, "tools[0].function.name", "name"),
    ({"tools": [tool("f", examples=[1])], "tool_choice": "none"},
     "tools[0].function.examples", "Unsupported"),
    ({"tool_choice": {"type": "function", "function": {"name": "ping"}, "x": 1}},
     "tool_choice.x", "Unsupported"),
    ({"tool_choice": "sometimes"}, "tool_choice", "tool_choice"),
    ({"tool_choice": WEATHER, "response_format": {"type": "json_object"}},
     "response_format", "cannot be combined"),
    ({"tool_choice": "required", "guided_regex": "a+"}, "guided_regex", "cannot be combined"),
    ({"parallel_tool_calls": "yes", "tool_choice": "none"}, "parallel_tool_calls", "bool"),
    ({"tool_choice": "none", "messages": [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function"}]}
    ]}, "messages", "function"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param", "text"), BAD)
def test_bad_tool_requests_are_400(
    http: httpx.Client, fields: dict[str, Any], param: str, text: str
) -> None:
    err = error(http.post(CHAT, json=body(**fields)))
    assert err["param"] == param and text in err["message"], err
    still_serves(http)


def test_a_schema_that_does_not_compile_is_400(http: httpx.Client) -> None:
    bad = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}}
    err = error(http.post(CHAT, json=body(tools=[tool("f", bad)], tool_choice="required")))
    assert err["param"] == "tools", err
    still_serves(http)


# ---- "auto" on a server with a parser ------------------------------------------------------
def test_auto_answers_well_formed(tool_http: httpx.Client) -> None:
    fields = {"max_tokens": 24, "ignore_eos": True}
    (plain,) = chat(tool_http, tool_choice="none", **fields)
    for extra in ({"tool_choice": "auto"}, {}):  # explicit, and the default with tools
        (c,) = chat(tool_http, **extra, **fields)
        # The random model writes no <tool_call> block: its text is the content, unchanged.
        assert c["message"]["content"] == plain["message"]["content"]
        assert c["message"]["tool_calls"] == [] and c["finish_reason"] == "length"
        acc = streamed(tool_http, **extra, **fields)[0]
        assert acc["content"] == plain["message"]["content"] and acc["tool_calls"] == []
        assert acc["finish_reason"] == "length"
    err = error(tool_http.post(CHAT, json=body(tool_choice="auto", guided_regex="a+")))
    assert err["param"] == "guided_regex"
    (c,) = chat(tool_http, tool_choice=WEATHER)  # forced calls work here too
    check_call(c["message"]["tool_calls"][0])


HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"},
]


def test_tools_and_tool_messages_reach_the_template(tool_http: httpx.Client) -> None:
    r = tool_http.post("/tokenize", json={"messages": HISTORY, "tools": TOOLS})
    assert r.status_code == 200, r.text
    text = tool_http.post("/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    assert "Tools: get_weather convert ping" in text
    assert '<tool_call>get_weather {"city": "Paris"}</tool_call>' in text  # arguments: an object
    assert "<|tool|>\nSunny, 24 C [call_1]" in text
    without = tool_http.post("/tokenize", json={"messages": HISTORY}).json()["count"]
    assert without < r.json()["count"]
    (c,) = chat(tool_http, messages=HISTORY, tool_choice="none", max_tokens=4)
    assert c["finish_reason"] in ("stop", "length")
    err = error(tool_http.post("/tokenize", json={"prompt": "x", "tools": TOOLS}))
    assert err["param"] == "tools"
