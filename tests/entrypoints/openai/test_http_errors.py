"""Every error path over raw HTTP: OpenAI error bodies with the right status, type, param and
code for 400 (validation, limits, context length), 401, 404, 405 and 413; tokenize /
detokenize round trip. Unsupported fields: ``test_request_hardening.py``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.entrypoints.openai.conftest import (
    MAX_BODY_BYTES,
    MAX_MODEL_LEN,
    MODEL_NAME,
    ServerProc,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def http(server: ServerProc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30) as c:
        yield c


def error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return dict(err)


def test_auth_required_except_health(server: ServerProc) -> None:
    url = server.base_url
    for method, path in [("GET", "/v1/models"), ("POST", COMPLETIONS), ("GET", "/metrics")]:
        err = error(httpx.request(method, url + path, json={}), 401)
        assert err["code"] == "invalid_api_key"
        bad = {"Authorization": "Bearer wrong"}
        error(httpx.request(method, url + path, json={}, headers=bad), 401)
    error(httpx.get(url + "/no/such/route"), 401)
    assert httpx.get(url + "/health").status_code == 200


def test_not_found(http: httpx.Client) -> None:
    err = error(http.post(CHAT, json={"model": "gpt-4", "messages": MSGS}), 404)
    assert err["param"] == "model" and err["code"] == "model_not_found"
    err = error(http.post(COMPLETIONS, json={"model": "nope", "prompt": "x"}), 404)
    assert err["code"] == "model_not_found"
    assert error(http.get("/v1/nothing"), 404)["code"] == "not_found"
    assert error(http.get(COMPLETIONS), 405)["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (CHAT, {"messages": MSGS, "temperature": "hot"}, "temperature"),
        (CHAT, {"messages": MSGS, "max_tokens": 1.5}, "max_tokens"),
        (CHAT, {"messages": "hello"}, "messages"),
        (CHAT, {}, "messages"),
        (CHAT, {"messages": []}, "messages"),
        (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages"),
        (CHAT, {"messages": MSGS, "temperature": -1}, "temperature"),
        (CHAT, {"messages": MSGS, "top_p": 0}, "top_p"),
        (CHAT, {"messages": MSGS, "n": 0}, "n"),
        (CHAT, {"messages": MSGS, "n": 129}, "n"),
        (CHAT, {"messages": MSGS, "presence_penalty": 3}, "presence_penalty"),
        (CHAT, {"messages": MSGS, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        (CHAT, {"messages": MSGS, "top_logprobs": 2}, "top_logprobs"),
        (CHAT, {"messages": MSGS, "stop": ["s"] * 17}, "stop"),
        (CHAT, {"messages": MSGS, "stop": "x" * 257}, "stop"),
        (CHAT, {"messages": MSGS, "stop_token_ids": [10**6]}, "stop_token_ids"),
        (CHAT, {"messages": MSGS, "max_tokens": 0}, "max_tokens"),
        (CHAT, {"messages": MSGS, "stream": "sometimes"}, "stream"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages",
        ),
        (COMPLETIONS, {"prompt": "x", "logprobs": 21}, "logprobs"),
        (COMPLETIONS, {"prompt": []}, "prompt"),
        (COMPLETIONS, {"prompt": [[]]}, "prompt"),
        (COMPLETIONS, {"prompt": 5}, "prompt"),
        (COMPLETIONS, {"prompt": [1, 10**6]}, "prompt"),
        (COMPLETIONS, {"prompt": "x", "suffix": "y"}, "suffix"),
        (COMPLETIONS, {"prompt": "x", "best_of": 3}, "best_of"),
    ],
)
def test_bad_requests(http: httpx.Client, path: str, body: dict[str, Any], param: str) -> None:
    err = error(http.post(path, json={"model": MODEL_NAME, **body}), 400)
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_sampling_params_errors_are_400(http: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 2, "min_tokens": 5}
    assert "min_tokens" in error(http.post(COMPLETIONS, json=body), 400)["message"]


def test_malformed_json_is_400(http: httpx.Client) -> None:
    r = http.post(CHAT, content=b"{not json", headers={"Content-Type": "application/json"})
    assert error(r, 400)["param"] is None  # not the byte offset of the JSON error
    error(http.post(CHAT, json=[1, 2, 3]), 400)


def test_context_length(http: httpx.Client) -> None:
    long_ids = [100] * MAX_MODEL_LEN
    err = error(http.post(COMPLETIONS, json={"prompt": long_ids}), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    body = {"prompt": [100] * 500, "max_tokens": 20}
    err = error(http.post(COMPLETIONS, json=body), 400)
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert "512" in err["message"]
    body = {"messages": [{"role": "user", "content": "word " * 600}], "max_tokens": 5}
    assert error(http.post(CHAT, json=body), 400)["code"] == "context_length_exceeded"
    ok = http.post(COMPLETIONS, json={"prompt": [100] * 500, "max_tokens": 12})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] <= 12


def test_body_too_large(server: ServerProc) -> None:
    url = server.base_url + COMPLETIONS
    big = b'{"prompt": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    r = httpx.post(url, content=big, headers={**server.headers, "Content-Type": "application/json"})
    assert error(r, 413)["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no Content-Length: the server counts the bytes
        yield b'{"prompt": "'
        for _ in range(MAX_BODY_BYTES // 65536 + 2):
            yield b"a" * 65536
        yield b'"}'

    r = httpx.post(url, content=chunked(), headers=server.headers)
    assert error(r, 413)["code"] == "request_too_large"


def test_all_roles_accepted(http: httpx.Client) -> None:
    msgs = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
        {"role": "user", "content": "thanks"},
    ]
    r = http.post(CHAT, json={"messages": msgs, "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_tokenize_detokenize(http: httpx.Client, tiny_tokenizer: Any) -> None:
    r = http.post("/tokenize", json={"prompt": "def f(x):"}).json()
    assert r["tokens"] == tiny_tokenizer.encode("def f(x):") and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == MAX_MODEL_LEN
    chat = http.post("/tokenize", json={"messages": MSGS}).json()
    assert chat["count"] > 3
    back = http.post("/detokenize", json={"tokens": r["tokens"][1:]}).json()
    assert back == {"prompt": "def f(x):"}
    error(http.post("/detokenize", json={"tokens": [10**6]}), 400)
    error(http.post("/tokenize", json={}), 400)
    error(http.post("/tokenize", json={"prompt": "x", "model": "other"}), 404)
