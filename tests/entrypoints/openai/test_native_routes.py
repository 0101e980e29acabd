"""SGLang's native routes (``/generate`` and friends) on a real server (tiny llama, CPU).

Generated text is checked against transformers' greedy decoding and logprobs against
transformers' log-softmax, so the tests prove the route's shape and its numbers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.tiny_models import EOS_TOKEN_ID, hf_greedy, hf_logprobs
from tests.lang.native_server import ThreadServer, serve_in_thread

KEY = "sk-native"


@pytest.fixture(scope="module")
def server(llama_dir: Path) -> Iterator[ThreadServer]:
    with serve_in_thread(llama_dir, api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ThreadServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60) as c:
        yield c


def _gen(client: httpx.Client, body: dict[str, Any], status: int = 200) -> Any:
    r = client.post("/generate", json=body)
    assert r.status_code == status, r.text
    return r.json()


def _ids(client: httpx.Client, text: str) -> list[int]:
    r = client.post("/tokenize", json={"prompt": text})
    assert r.status_code == 200, r.text
    return list(r.json()["tokens"])


def test_auth_is_required(server: ThreadServer) -> None:
    for method, path in (("POST", "/generate"), ("GET", "/get_model_info")):
        r = httpx.request(method, server.base_url + path, json={"text": "hi"})
        assert r.status_code == 401, (path, r.text)


def test_model_and_server_info(client: httpx.Client, llama_dir: Path) -> None:
    info = client.get("/get_model_info").json()
    assert info["is_generation"] is True and info["model_path"] == llama_dir.name
    assert not info["model_path"].startswith("/")
    for path in ("/get_server_info", "/server_info"):
        srv = client.get(path).json()
        assert srv["max_model_len"] == 512 and srv["version"]
    assert client.get("/health_generate").status_code == 200


def test_flush_cache_drops_the_prefix_cache(client: httpx.Client) -> None:
    """The same prompt again hits the prefix cache; after /flush_cache it does not."""
    body = {"text": "one two three four " * 12, "sampling_params": {"max_new_tokens": 1}}
    _gen(client, body)
    assert _gen(client, body)["meta_info"]["cached_tokens"] > 0
    r = client.post("/flush_cache")
    assert r.status_code == 200 and r.text == "Cache flushed.\n", r.text
    assert _gen(client, body)["meta_info"]["cached_tokens"] == 0


def test_greedy_text_matches_transformers(client: httpx.Client, llama_dir: Path) -> None:
    prompt = "def add(a, b):"
    ids = _ids(client, prompt)
    want = hf_greedy(llama_dir, [ids], 8)[0]
    body = {
        "text": prompt,
        "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True},
    }
    out = _gen(client, body)
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == len(ids) and meta["completion_tokens"] == 8
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    by_ids = _gen(client, {**body, "text": None, "input_ids": ids, "return_logprob": True})
    assert by_ids["text"] == out["text"]
    assert [e[1] for e in by_ids["meta_info"]["output_token_logprobs"]] == want


def test_prompt_logprobs_match_transformers(client: httpx.Client, llama_dir: Path) -> None:
    prompt = "import os\nimport sys"
    ids = _ids(client, prompt)
    ref = hf_logprobs(llama_dir, ids)
    body = {
        "text": prompt,
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": 2,
        "return_text_in_logprobs": True,
    }
    meta = _gen(client, body)["meta_info"]
    assert meta["completion_tokens"] == 0 and meta["output_token_logprobs"] == []
    entries = meta["input_token_logprobs"]
    assert [e[1] for e in entries] == ids and entries[0][0] is None
    for p in range(1, len(ids)):
        assert entries[p][0] == pytest.approx(ref[p - 1, ids[p]].item(), abs=1e-4)
        assert isinstance(entries[p][2], str)
        top = meta["input_top_logprobs"][p]
        assert [t[1] for t in top] == ref[p - 1].topk(2).indices.tolist()
    assert meta["input_top_logprobs"][0] is None

    # logprob_start_len picks the reported positions; -1 (the default) the last token only.
    # Fewer positions computed (only from the start on) may round the last bits differently.
    def same(a: list[list[Any]], b: list[list[Any]]) -> bool:
        return [(e[1], e[2]) for e in a] == [(e[1], e[2]) for e in b] and all(
            x[0] == pytest.approx(y[0], abs=1e-5) for x, y in zip(a, b, strict=True)
        )

    tail = _gen(client, {**body, "logprob_start_len": 3})["meta_info"]["input_token_logprobs"]
    assert same(tail, entries[3:])
    last = _gen(client, {**body, "logprob_start_len": -1})["meta_info"]["input_token_logprobs"]
    assert same(last, entries[-1:])


def test_batch_answers_in_order(client: httpx.Client) -> None:
    texts = ["class Foo:", "x = 1", "for i in range(3):"]
    sp = {"max_new_tokens": 4, "temperature": 0}
    singles = [_gen(client, {"text": t, "sampling_params": sp})["text"] for t in texts]
    batch = _gen(client, {"text": texts, "sampling_params": sp})
    assert isinstance(batch, list) and [b["text"] for b in batch] == singles
    ids = [_ids(client, t) for t in texts]
    by_ids = _gen(client, {"input_ids": ids, "sampling_params": sp})
    assert [b["text"] for b in by_ids] == singles
    n2 = _gen(client, {"text": texts[0], "sampling_params": {**sp, "n": 2}})
    assert [b["text"] for b in n2] == [singles[0]] * 2


def test_stop_string_and_token(client: httpx.Client) -> None:
    sp = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = _gen(client, {"text": "a", "sampling_params": sp})["text"]
    assert len(full) > 2
    stop = full[2:4]
    out = _gen(client, {"text": "a", "sampling_params": {**sp, "stop": [stop]}})
    assert out["text"] == full[: full.index(stop)]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    lp = _gen(client, {"text": "a", "sampling_params": sp, "return_logprob": True})
    second = lp["meta_info"]["output_token_logprobs"][1][1]
    sp_tok = {**sp, "stop_token_ids": [second]}
    out = _gen(client, {"text": "a", "sampling_params": sp_tok})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": second}
    assert out["meta_info"]["completion_tokens"] == 2
    eos = _gen(
        client,
        {
            "text": "a",
            "sampling_params": {**sp, "stop_token_ids": [EOS_TOKEN_ID], "max_new_tokens": 1},
        },
    )
    assert eos["meta_info"]["completion_tokens"] == 1


def test_streaming_is_cumulative(client: httpx.Client) -> None:
    body = {"text": "def f():", "sampling_params": {"max_new_tokens": 10, "temperature": 0}}
    final = _gen(client, body)
    chunks: list[dict[str, Any]] = []
    lines: list[str] = []
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                lines.append(line)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
    texts = [c["text"] for c in chunks]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))
    assert texts[-1] == final["text"] and len(chunks) > 1
    assert chunks[-1]["meta_info"]["finish_reason"] == final["meta_info"]["finish_reason"]


def test_prefix_cache_priming_is_reported(client: httpx.Client) -> None:
    prefix = "The quick brown fox jumps over the lazy dog. " * 4
    _gen(client, {"text": prefix, "sampling_params": {"max_new_tokens": 0}})
    out = _gen(client, {"text": prefix + "Then", "sampling_params": {"max_new_tokens": 1}})
    assert out["meta_info"]["cached_tokens"] > 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"text": "a", "lora_path": "x"}, "lora_path"),
        ({"text": "a", "sampling_params": {"stop_regex": ["x"]}}, "sampling_params.stop_regex"),
        ({"text": "a", "input_ids": [1]}, "text"),
        ({}, "text"),
        ({"text": "a", "sampling_params": {"max_new_tokens": "3"}}, "sampling_params"),
        ({"text": "a", "sampling_params": {"top_p": 0}}, "sampling_params"),
        ({"input_ids": [10**6]}, "input_ids"),
        ({"text": "a", "return_logprob": True, "logprob_start_len": 5}, "logprob_start_len"),
        ({"text": "a", "sampling_params": {"regex": "a", "ebnf": "b"}}, "sampling_params"),
        (
            {"text": "a", "sampling_params": {"max_new_tokens": 0, "n": 2}},
            "sampling_params.max_new_tokens",
        ),
        ({"text": "a" * 3000, "sampling_params": {"max_new_tokens": 1}}, None),
    ],
)
def test_bad_requests_are_400s(client: httpx.Client, body: dict[str, Any], param: Any) -> None:
    err = _gen(client, body, status=400)["error"]
    if param is not None:
        assert err["param"] == param, err
    # The server keeps serving.
    assert _gen(client, {"text": "a", "sampling_params": {"max_new_tokens": 1}})["text"] != None  # noqa: E711


def test_null_fields_sglang_sends_are_accepted(client: httpx.Client) -> None:
    body = {
        "text": "a",
        "lora_path": None,
        "session_id": None,
        "sampling_params": {"max_new_tokens": 2, "stop_regex": [], "json_schema": None},
    }
    assert _gen(client, body)["meta_info"]["completion_tokens"] >= 1


def test_regex_constrains_output(client: httpx.Client) -> None:
    sp = {"max_new_tokens": 8, "temperature": 0, "regex": "(yes|no)"}
    out = _gen(client, {"text": "Answer:", "sampling_params": sp})
    assert out["text"] in ("yes", "no")


def test_streaming_a_batch_tags_each_completion(client: httpx.Client) -> None:
    texts = ["x = ", "def g():"]
    body = {"text": texts, "sampling_params": {"max_new_tokens": 5, "temperature": 0}}
    final = _gen(client, body)
    last: dict[int, dict[str, Any]] = {}
    with client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                last[chunk["index"]] = chunk
    assert [last[i]["text"] for i in (0, 1)] == [f["text"] for f in final]


def test_seed_makes_sampling_reproducible(client: httpx.Client) -> None:
    sp = {"max_new_tokens": 8, "temperature": 1.0, "sampling_seed": 7}
    a = _gen(client, {"text": "a", "sampling_params": sp})["text"]
    assert _gen(client, {"text": "a", "sampling_params": sp})["text"] == a
    too_big = {**sp, "sampling_seed": 2**63}
    assert _gen(client, {"text": "a", "sampling_params": too_big}, 400)["error"]["param"]


def test_queue_timeout_waits_for_the_first_token_only(
    server: ThreadServer, client: httpx.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --queue-timeout the engine streams to the route (the timeout bounds the wait for
    the first token, not the whole generation): the answer is still whole and the same."""
    body = {
        "text": "def h():",
        "return_logprob": True,
        "logprob_start_len": 0,
        "sampling_params": {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True},
    }
    whole = _gen(client, body)
    state = server.app.state.server
    kinds: list[str] = []
    generate = state.engine.generate

    def recording(prompt: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        kinds.append(params.output_kind.name)
        return generate(prompt, params, *args, **kwargs)

    monkeypatch.setattr(state.engine, "generate", recording)
    monkeypatch.setattr(state, "queue_timeout", 30.0)
    streamed_inside = _gen(client, body)
    assert kinds == ["DELTA"]
    whole["meta_info"].pop("id")
    streamed_inside["meta_info"].pop("id")
    whole["meta_info"].pop("cached_tokens")
    streamed_inside["meta_info"].pop("cached_tokens")
    assert streamed_inside == whole and whole["meta_info"]["completion_tokens"] == 40
    monkeypatch.setattr(state, "queue_timeout", 1e-6)
    err = _gen(client, body, status=503)["error"]
    assert err["code"] == "queue_timeout"


class _UnstartedEngine:
    """Only what ``build_app`` reads before any request."""

    def __init__(self, tokenizer: Any) -> None:
        import argparse

        self.tokenizer = tokenizer
        self.config = argparse.Namespace(model_config=argparse.Namespace(model="/models/m"))
        self.input_processor = argparse.Namespace(max_model_len=64)
        self.is_running = False


def test_registering_needs_no_started_engine(tiny_tokenizer: Any) -> None:
    import argparse

    from fastapi.testclient import TestClient

    from pagedllm.entrypoints.openai.api_server import build_app
    from pagedllm.entrypoints.openai.native_routes import register_native_routes

    args = argparse.Namespace(served_model_name=["m"])
    app = build_app(_UnstartedEngine(tiny_tokenizer), args)  # type: ignore[arg-type]
    register_native_routes(app, args)
    count = len(app.routes)
    register_native_routes(app, args)  # a second registration changes nothing
    assert len(app.routes) == count
    client = TestClient(app)
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/generate", "/get_model_info", "/health_generate", "/flush_cache"} <= set(paths)
    assert client.get("/get_model_info").json()["model_path"] == "m"
    r = client.post("/generate", json={"text": "hi"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


def test_logprobs_after_a_start_use_the_prefix_cache(client: httpx.Client) -> None:
    """What comes before logprob_start_len needs no logits, so a repeated prompt scores its
    tail from the prefix cache (as SGLang's select does after a shared context)."""
    client.post("/flush_cache")
    text = "alpha beta gamma delta " * 12
    n = len(_ids(client, text))
    body = {
        "text": text,
        "sampling_params": {"max_new_tokens": 0},
        "return_logprob": True,
        "logprob_start_len": n - 2,
    }
    first = _gen(client, body)["meta_info"]
    again = _gen(client, body)["meta_info"]
    assert first["cached_tokens"] == 0 and again["cached_tokens"] > n // 2
    assert [e[1] for e in again["input_token_logprobs"]] == [
        e[1] for e in first["input_token_logprobs"]
    ]
    for a, b in zip(again["input_token_logprobs"], first["input_token_logprobs"], strict=True):
        assert a[0] == pytest.approx(b[0], abs=1e-4)
    full = _gen(client, {**body, "logprob_start_len": 0})["meta_info"]
    assert full["cached_tokens"] == 0  # every position is reported: nothing may be skipped
