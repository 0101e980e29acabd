"""``POST /v1/responses`` driven by the official ``openai`` client: the same greedy text as chat
completions, instructions as the system message, the streamed event sequence, structured
output through ``text.format``, and 400s for what is not implemented."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.entrypoints.openai.conftest import API_KEY, MODEL_NAME, ServerProc


@pytest.fixture(scope="module")
def client(server: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)


def _chat(client: openai.OpenAI, messages: list[dict[str, Any]], max_tokens: int) -> Any:
    return client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,  # type: ignore[arg-type]
    )


def test_text_in_text_out(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=MODEL_NAME, input="hello", max_output_tokens=8, temperature=0.0
    )
    ref = _chat(client, [{"role": "user", "content": "hello"}], 8)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == MODEL_NAME
    assert r.output_text == ref.choices[0].message.content
    assert r.usage is not None and r.usage.output_tokens == ref.usage.completion_tokens  # type: ignore[union-attr]
    assert r.usage.input_tokens == ref.usage.prompt_tokens  # type: ignore[union-attr]
    if ref.choices[0].finish_reason == "length":
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"  # type: ignore[union-attr]
    else:
        assert r.status == "completed"


def test_instructions_and_message_list(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=MODEL_NAME,
        instructions="Be terse.",
        input=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "hello"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "again"}]},
        ],
        max_output_tokens=6,
        temperature=0.0,
    )
    ref = _chat(
        client,
        [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"},
        ],
        6,
    )
    assert r.output_text == ref.choices[0].message.content


def test_streamed_events(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model=MODEL_NAME, input="hello", max_output_tokens=8, temperature=0.0, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert deltas == final.output_text == events[-4].text  # type: ignore[union-attr]
    ref = client.responses.create(
        model=MODEL_NAME, input="hello", max_output_tokens=8, temperature=0.0
    )
    assert deltas == ref.output_text and final.usage.output_tokens == ref.usage.output_tokens  # type: ignore[union-attr]


def test_json_schema_format(client: openai.OpenAI) -> None:
    schema = {"type": "string", "enum": ["yes", "no"]}
    r = client.responses.create(
        model=MODEL_NAME,
        input="yes or no?",
        max_output_tokens=20,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema}},
    )
    assert json.loads(r.output_text) in ("yes", "no")


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


def test_function_tools_round_trip(client: openai.OpenAI) -> None:
    r = client.responses.create(
        model=MODEL_NAME,
        input="Weather in Oslo?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=60,
    )
    calls = [item for item in r.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    args = json.loads(calls[0].arguments)  # forced calls follow the schema (a grammar)
    assert set(args) == {"city"} and isinstance(args["city"], str)
    follow = client.responses.create(
        model=MODEL_NAME,
        input=[
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "type": "function_call",
                "call_id": calls[0].call_id,
                "name": "get_weather",
                "arguments": calls[0].arguments,
            },
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        max_output_tokens=5,
        temperature=0.0,
    )
    assert follow.output[0].type == "message" and follow.usage.input_tokens > 0  # type: ignore[union-attr]


def test_streamed_function_call(client: openai.OpenAI) -> None:
    """A forced call streamed: a function_call item whose argument deltas add up to the
    final item's arguments, the same as the call made without streaming (greedy)."""
    kw: dict[str, Any] = {
        "model": MODEL_NAME,
        "input": "Weather in Oslo?",
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "max_output_tokens": 60,
        "temperature": 0.0,
    }
    events = list(client.responses.create(stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [e.item.type for e in added] == ["function_call"]  # type: ignore[union-attr]
    item_id = added[0].item.id  # type: ignore[union-attr]
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert deltas and all(e.item_id == item_id for e in deltas)  # type: ignore[union-attr]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    streamed = "".join(e.delta for e in deltas)  # type: ignore[union-attr]
    assert done.arguments == streamed  # type: ignore[union-attr]
    assert events[-1].type == "response.completed"
    final = [o for o in events[-1].response.output if o.type == "function_call"]  # type: ignore[union-attr]
    assert len(final) == 1 and final[0].id == item_id and final[0].arguments == streamed
    ref = client.responses.create(**kw)
    ref_calls = [o for o in ref.output if o.type == "function_call"]
    assert [c.arguments for c in ref_calls] == [streamed] and ref_calls[0].name == "get_weather"
    assert set(json.loads(streamed)) == {"city"}


@pytest.mark.parametrize(
    "extra,field",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format"),
    ],
)
def test_unsupported_fields_are_400(server: ServerProc, extra: dict[str, Any], field: str) -> None:
    body = {"model": MODEL_NAME, "input": "hi", "store": False, "metadata": {"a": "b"}, **extra}
    r = httpx.post(f"{server.base_url}/v1/responses", json=body, headers=server.headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_unknown_model_is_404(server: ServerProc) -> None:
    body = {"model": "nope", "input": "hi"}
    r = httpx.post(f"{server.base_url}/v1/responses", json=body, headers=server.headers)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
