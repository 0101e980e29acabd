"""Pieces of tool calling that need no server: chat-template messages built from a history
with tool calls, and stream deltas that never repeat a call's index."""

from __future__ import annotations

from pagedllm.entrypoints.openai.chat_render import template_messages
from pagedllm.entrypoints.openai.protocol import ChatMessage
from pagedllm.entrypoints.openai.tool_calls import delta_dicts
from pagedllm.entrypoints.openai.tool_parsers import DeltaMessage, ToolCallDelta
from tests.entrypoints.openai.test_tool_calls import HISTORY


def test_template_messages_parse_call_arguments() -> None:
    msgs = [ChatMessage.model_validate(m, strict=False) for m in HISTORY]
    out = template_messages(msgs)
    assert out[1]["content"] == "" and out[1]["tool_calls"][0]["function"]["arguments"] == {
        "city": "Paris"
    }
    assert out[2] == {"role": "tool", "content": "Sunny, 24 C", "tool_call_id": "call_1"}
    odd = dict(HISTORY[1], tool_calls=[dict(HISTORY[1]["tool_calls"][0])])  # type: ignore[arg-type]
    odd["tool_calls"][0]["function"] = {"name": "f", "arguments": "not json"}
    out = template_messages([ChatMessage.model_validate(odd, strict=False)])
    assert out[0]["tool_calls"][0]["function"]["arguments"] == "not json"


def test_delta_dicts_never_repeat_an_index() -> None:
    msg = DeltaMessage(
        "hi",
        [
            ToolCallDelta(0, "", "call_a", "f"),
            ToolCallDelta(0, "{}"),
            ToolCallDelta(1, "", "call_b", "g"),
            ToolCallDelta(1, '{"x"'),
        ],
    )
    out = delta_dicts(msg, parallel=True)
    assert out[0] == {"content": "hi"}
    assert [[d["index"] for d in o["tool_calls"]] for o in out[1:]] == [[0], [0, 1], [1]]
    assert out[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
    one = delta_dicts(msg, parallel=False)
    assert [[d["index"] for d in o["tool_calls"]] for o in one[1:]] == [[0], [0]]
