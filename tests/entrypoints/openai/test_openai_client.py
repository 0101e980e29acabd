"""The server driven by the official ``openai`` client: shapes, streaming, n > 1, logprobs,
stop strings, seeds, usage, prefix-cache accounting, greedy equality with the offline ``LLM``,
64 concurrent streams, and client disconnects freeing the engine's blocks."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest

from pagedllm import LLM, SamplingParams
from tests.entrypoints.openai.conftest import API_KEY, MODEL_NAME, ServerProc

GREEDY = {"temperature": 0.0}
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:  # type: ignore[no-untyped-def]
    return LLM(str(llama_dir))


@pytest.fixture(scope="module")
def client(server: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture
def aclient(server: ServerProc) -> openai.AsyncOpenAI:
    """Per test: its connection pool belongs to the test's event loop."""
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0)


def offline(llm: LLM, prompt: Any, chat: bool = False, **kw: Any) -> Any:
    params = SamplingParams(**kw)
    if chat:
        return llm.chat(prompt, params, use_tqdm=False)[0]
    return llm.generate(prompt, params, use_tqdm=False)[0]


def metrics(server: ServerProc) -> dict[str, float]:
    text = httpx.get(f"{server.base_url}/metrics", headers=server.headers).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            key = name.split("{")[0]
            out[key] = out.get(key, 0.0) + float(value)
    return out


def log_line(server: ServerProc, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.log().splitlines():
            if line.startswith("{") and f'"request_id": "{request_id}"' in line:
                return dict(json.loads(line))
        time.sleep(0.05)
    raise AssertionError(f"no log line for {request_id}")


def wait_idle(server: ServerProc, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(server)
        idle = m["pagedllm:num_requests_running"] == 0 and m["pagedllm:kv_cache_usage_perc"] == 0
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def test_models_version_health(client: openai.OpenAI, server: ServerProc) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].model_extra is not None and models[0].model_extra["max_model_len"] == 512
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # no key needed
    version = httpx.get(f"{server.base_url}/version", headers=server.headers).json()
    assert version == {"version": "0.1.0"}


def test_chat_matches_offline(client: openai.OpenAI, llm: LLM) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": [{"type": "text", "text": "def add(a, b):"}]},
    ]
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=12, extra_body=NO_EOS, **GREEDY
    )
    flat = [messages[0], {"role": "user", "content": "def add(a, b):"}]
    ref = offline(llm, flat, chat=True, temperature=0.0, max_tokens=12, ignore_eos=True)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL_NAME
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == ref.outputs[0].text
    assert choice.finish_reason == "length"
    assert r.usage is not None and r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completion_prompt_forms_match_offline(
    client: openai.OpenAI, llm: LLM, tiny_tokenizer: Any
) -> None:
    texts = ["import os\n", "class Foo:"]
    ids = tiny_tokenizer.encode("for i in range(")
    kw = dict(max_tokens=6, temperature=0.0, ignore_eos=True)
    refs = [offline(llm, p, **kw).outputs[0].text for p in [*texts, ids]]
    r = client.completions.create(
        model=MODEL_NAME, prompt=texts, max_tokens=6, n=2, extra_body=NO_EOS, **GREEDY
    )
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [refs[0], refs[0], refs[1], refs[1]]
    single = client.completions.create(
        model=MODEL_NAME, prompt=ids, max_tokens=6, extra_body=NO_EOS, **GREEDY
    )
    assert single.choices[0].text == refs[2]
    nested = client.completions.create(
        model=MODEL_NAME, prompt=[ids, ids], max_tokens=6, extra_body=NO_EOS, **GREEDY
    )
    assert [c.text for c in nested.choices] == [refs[2], refs[2]]
    assert nested.usage is not None and nested.usage.prompt_tokens == 2 * len(ids)


def test_chat_stream_shape(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=8,
        extra_body=NO_EOS,
        **GREEDY,
    )
    full = client.chat.completions.create(**kw)
    chunks = list(
        client.chat.completions.create(
            **kw, n=2, stream=True, stream_options={"include_usage": True}
        )
    )
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    for idx in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == idx]
        assert mine[0].delta.role == "assistant" and mine[0].delta.content == ""
        assert all(m.finish_reason is None for m in mine[:-1])
        assert mine[-1].finish_reason == "length" and mine[-1].delta.content is None
        assert "".join(m.delta.content or "" for m in mine) == full.choices[0].message.content
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 16
    assert last.usage.prompt_tokens == full.usage.prompt_tokens  # type: ignore[union-attr]


def test_raw_sse_framing(server: ServerProc) -> None:
    body = {"model": MODEL_NAME, "prompt": "x = ", "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST", f"{server.base_url}/v1/completions", json=body, headers=server.headers
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events[:-1]]
    assert all("usage" not in p for p in payloads)  # only with include_usage
    assert payloads[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    # vLLM's continuous_usage_stats: running usage on every chunk
    body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    with httpx.stream(
        "POST", f"{server.base_url}/v1/completions", json=body, headers=server.headers
    ) as r:
        payloads = [json.loads(x[6:]) for x in r.iter_lines() if x and x != "data: [DONE]"]
    used = [p["usage"]["completion_tokens"] for p in payloads]
    assert used == sorted(used) and used[-1] == 4 and all(p["usage"] for p in payloads)


@pytest.mark.asyncio
async def test_async_completion_stream(aclient: openai.AsyncOpenAI, llm: LLM) -> None:
    prompt = "def main():\n"
    ref = offline(llm, prompt, temperature=0.0, max_tokens=10, ignore_eos=True).outputs[0].text
    stream = await aclient.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=10,
        stream=True,
        echo=True,
        stream_options={"include_usage": True},
        extra_body=NO_EOS,
        **GREEDY,
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == prompt + ref
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].text == ""


def test_chat_logprobs_match_offline(client: openai.OpenAI, llm: LLM) -> None:
    messages = [{"role": "user", "content": "Ça va? 你好"}]
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=8,
        logprobs=True,
        top_logprobs=3,
        extra_body=NO_EOS,
        **GREEDY,
    )
    ref = offline(
        llm, messages, chat=True, temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 8
    ref_ids = ref.outputs[0].token_ids
    for entry, tid, ref_lp in zip(content, ref_ids, ref.outputs[0].logprobs, strict=True):
        assert entry.logprob == pytest.approx(ref_lp[tid].logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the best token
    raw = b"".join(bytes(e.bytes or []) for e in content)
    assert raw.decode("utf-8", errors="replace") == r.choices[0].message.content


def test_completion_logprobs_echo_and_scoring(client: openai.OpenAI, tiny_tokenizer: Any) -> None:
    prompt = "print('hi')"
    n_prompt = len(tiny_tokenizer.encode(prompt))
    r = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=5, logprobs=2, echo=True, extra_body=NO_EOS
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert r.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == n_prompt + 5
    assert lp.token_logprobs[0] is None and lp.top_logprobs is not None
    assert lp.top_logprobs[0] is None
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert all(1 <= len(t) <= 3 for t in lp.top_logprobs[1:] if t)  # keys may collide
    offsets = lp.text_offset or []
    assert offsets == sorted(offsets) and len(offsets) == len(lp.tokens)
    score = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=0, logprobs=0, echo=True
    )
    assert score.choices[0].text == prompt
    assert score.usage is not None and score.usage.completion_tokens == 0
    scored = score.choices[0].logprobs
    assert scored is not None and scored.token_logprobs is not None
    assert scored.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:n_prompt], abs=1e-4)


def test_stop_strings(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model=MODEL_NAME, prompt="while True:", max_tokens=24, **GREEDY)
    full = client.completions.create(**kw, extra_body=NO_EOS).choices[0].text
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip())
    cut = full.index(stop)
    r = client.completions.create(**kw, stop=[stop, "never-seen-stop"], extra_body=NO_EOS)
    choice = r.choices[0]
    assert choice.text == full[:cut] and choice.finish_reason == "stop"
    assert choice.model_extra is not None and choice.model_extra["stop_reason"] == stop


def test_seed_reproducible(client: openai.OpenAI) -> None:
    def run(seed: int) -> list[str]:
        r = client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "tell me"}],
            max_tokens=16,
            temperature=1.0,
            n=2,
            seed=seed,
            extra_body=NO_EOS,
        )
        return [c.message.content or "" for c in r.choices]

    a, b, c = run(1234), run(1234), run(99)
    assert a == b and a != c


def test_prefix_cache_reported(client: openai.OpenAI) -> None:
    prompt = "import collections\n" * 12
    kw: dict[str, Any] = dict(model=MODEL_NAME, prompt=prompt, max_tokens=2)
    first = client.completions.create(**kw).usage
    second = client.completions.create(**kw).usage
    assert first is not None and second is not None
    assert second.prompt_tokens_details is not None
    assert second.prompt_tokens_details.cached_tokens >= 32


@pytest.mark.asyncio
async def test_64_concurrent_streams(aclient: openai.AsyncOpenAI, llm: LLM) -> None:
    prompts = [f"# task {i}\ndef f{i}(x):" for i in range(64)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    refs = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]

    async def one(prompt: str) -> str:
        stream = await aclient.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=8, stream=True, extra_body=NO_EOS, **GREEDY
        )
        return "".join([c.choices[0].text async for c in stream if c.choices])

    assert await asyncio.gather(*(one(p) for p in prompts)) == refs


def test_disconnect_mid_stream_frees_blocks(server: ServerProc) -> None:
    body = {"model": MODEL_NAME, "prompt": "def", "max_tokens": 500, "stream": True, **NO_EOS}
    headers = {**server.headers, "X-Request-Id": "disconnect-stream"}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body, headers=headers) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert all(g == "" or g.startswith("data: ") for g in got)
        busy = metrics(server)
        assert busy["pagedllm:num_requests_running"] >= 1
        assert busy["pagedllm:kv_cache_usage_perc"] > 0
    idle = wait_idle(server)
    assert idle["pagedllm:num_requests_running"] == 0
    assert idle["pagedllm:kv_cache_usage_perc"] == 0
    entry = log_line(server, "disconnect-stream")
    assert entry["status"] == "client_disconnected" and entry["output_tokens"] < 500


def test_disconnect_non_streaming_aborts(server: ServerProc) -> None:
    body = {"model": MODEL_NAME, "prompt": "x", "max_tokens": 500, "n": 16, **NO_EOS}
    headers = {**server.headers, "X-Request-Id": "disconnect-plain"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.base_url}/v1/completions", json=body, headers=headers, timeout=0.3)
    assert log_line(server, "disconnect-plain")["status"] == "client_disconnected"
    idle = wait_idle(server)
    assert idle["pagedllm:num_requests_running"] == 0
    assert idle["pagedllm:kv_cache_usage_perc"] == 0


def test_request_id_log_line_and_metrics(server: ServerProc) -> None:
    url = f"{server.base_url}/v1/chat/completions"
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    r = httpx.post(url, json=body, headers={**server.headers, "X-Request-Id": "req-abc-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-abc-1"
    generated = httpx.post(url, json=body, headers=server.headers).headers["x-request-id"]
    assert len(generated) == 32
    entry = log_line(server, "req-abc-1")
    assert entry["id"] == r.json()["id"] and entry["status"] == "ok"
    assert entry["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert entry["output_tokens"] == r.json()["usage"]["completion_tokens"]
    for key in ("cached_tokens", "ttft_s", "total_s", "finish_reason"):
        assert key in entry
    m = metrics(server)
    assert m["pagedllm:request_success_total"] >= 2
    assert m["pagedllm:e2e_request_latency_seconds_count"] >= 2
    assert m["pagedllm:time_to_first_token_seconds_count"] >= 2
    assert m["pagedllm:request_queue_time_seconds_count"] >= 1
    assert m["pagedllm:inter_token_latency_seconds_count"] >= 1
    assert m["pagedllm:prompt_tokens_total"] > 0 and m["pagedllm:generation_tokens_total"] > 0
    assert m["pagedllm:prefix_cache_queries_total"] >= m["pagedllm:prefix_cache_hits_total"] > 0
