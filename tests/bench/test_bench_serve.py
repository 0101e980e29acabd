"""``pagedllm bench serve`` against a fake OpenAI-compatible SSE server (and the real one).

The fake server (aiohttp, its own thread and event loop, loopback only) streams
``max_tokens`` chunks: the first after ``ttft_s``, the rest ``itl_s`` apart, then a usage
chunk and ``[DONE]``. It records every request body, its arrival time and the peak number of
streams open at once, and can answer 500 to every ``fail_every``-th request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from pagedllm.bench.schemas import TICKET_SCHEMA
from pagedllm.bench.serve import arrival_offsets, resolve_tokenizer
from pagedllm.bench.serve_metrics import peak_concurrency
from pagedllm.entrypoints.cli import main

MODEL = "fake-model"
_TIMEOUT = ["--request-timeout", "20", "--disable-tqdm"]


@dataclass
class FakeServer:
    """A scripted OpenAI-compatible streaming server on 127.0.0.1 (see the module doc)."""

    tokenizer_root: str
    ttft_s: float = 0.0
    itl_s: float = 0.0
    fail_every: int = 0
    send_usage: bool = True
    bodies: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    active: int = 0
    peak: int = 0
    port: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    async def _models(self, request: web.Request) -> web.Response:
        card = {"id": MODEL, "object": "model", "root": self.tokenizer_root, "max_model_len": 512}
        return web.json_response({"object": "list", "data": [card]})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = len(self.bodies)
        self.bodies.append(body)
        self.arrivals.append(time.perf_counter())
        if self.fail_every and n % self.fail_every == self.fail_every - 1:
            return web.json_response({"error": {"message": "injected failure"}}, status=500)
        chat = request.path.endswith("/chat/completions")
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)

            async def send(
                text: str | None,
                usage: dict[str, int] | None = None,
                extra: dict[str, Any] | None = None,
            ) -> None:
                choice: dict[str, Any] = (
                    {"index": 0, "delta": {"content": text}} if chat else {"text": text}
                )
                if extra and "role" in extra:
                    choice["delta"]["role"] = extra["role"]
                elif extra:
                    choice.update(extra)
                chunk = {"choices": [] if text is None else [choice], "usage": usage}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())

            if chat:  # the role chunk: must not count as the first token
                await send("", extra={"role": "assistant"})
            await asyncio.sleep(self.ttft_s)
            k = int(body.get("max_tokens") or body["max_completion_tokens"])
            for i in range(k):
                if i:
                    await asyncio.sleep(self.itl_s)
                await send(f" w{i}")
            await send("", extra={"finish_reason": "length"})  # the finish chunk
            if self.send_usage and body.get("stream_options", {}).get("include_usage"):
                n_in = len(body["prompt"]) if not chat else 7
                await send(None, {"prompt_tokens": n_in, "completion_tokens": k})
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.active -= 1

    def start(self) -> FakeServer:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        ready = threading.Event()
        self._loop = loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        runner = web.AppRunner(app)

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.SockSite(runner, sock).start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        assert ready.wait(10), "fake server did not start"
        return self

    def stop(self) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def fake(tiny_tokenizer_dir: Path) -> Any:
    servers: list[FakeServer] = []

    def make(**kw: Any) -> FakeServer:
        servers.append(FakeServer(str(tiny_tokenizer_dir), **kw).start())
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def _bench(srv: FakeServer, out: Path, flags: str) -> dict[str, Any]:
    argv = ["bench", "serve", "--base-url", srv.base_url, *_TIMEOUT, *flags.split()]
    argv += ["--save-result", "--result-dir", str(out.parent), "--result-filename", out.name]
    assert main(argv) == 0
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").stat().st_size > 0
    return json.loads(out.read_text())


def test_measures_injected_delays(fake: Any, tmp_path: Path) -> None:
    srv = fake(ttft_s=0.1, itl_s=0.03)
    flags = "--num-prompts 6 --random-input-len 20 --random-output-len 5 --ignore-eos"
    res = _bench(srv, tmp_path / "delays.json", flags + " --metric-percentiles 50,90")
    assert res["completed"] == 6 and res["failed"] == 0 and res["model_id"] == MODEL
    assert res["total_output_tokens"] == 30 and res["output_lens"] == [5] * 6
    assert res["input_lens"] == [20] * 6 and res["total_input_tokens"] == 120
    assert 95 <= res["mean_ttft_ms"] <= 300 and 95 <= res["p99_ttft_ms"] <= 400
    assert 25 <= res["median_itl_ms"] <= 100 and 25 <= res["mean_tpot_ms"] <= 100
    assert 215 <= res["median_e2el_ms"] <= 500 and res["p90_e2el_ms"] is not None
    assert all(len(g) == 4 for g in res["itls"]) and res["tokenizer_id"] == srv.tokenizer_root
    assert res["request_throughput"] > 0 and res["total_token_throughput"] > 0
    body = srv.bodies[-1]  # bodies[0] is the unmeasured test request
    assert len(srv.bodies) == 7 and body["model"] == MODEL and body["max_tokens"] == 5
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["ignore_eos"] is True and body["temperature"] == 0.0
    assert len(body["prompt"]) == 20 and all(isinstance(t, int) for t in body["prompt"])
    md = (tmp_path / "delays.md").read_text()
    assert "| TTFT |" in md and "p90" in md and "request throughput" in md


def test_request_rate_pacing(fake: Any, tmp_path: Path) -> None:
    srv = fake(ttft_s=0.002)
    n, rate = 20, 25.0
    flags = f"--num-prompts {n} --random-input-len 8 --random-output-len 2 --request-rate {rate}"
    res = _bench(srv, tmp_path / "rate.json", flags + " --seed 3")
    want = arrival_offsets(n, rate, 1.0, 3)
    assert 0.3 * n / rate < want[-1] < 2.5 * n / rate
    assert want[-1] <= res["duration"] <= want[-1] + 1.0
    sent = np.asarray(srv.arrivals[1:]) - srv.arrivals[1]
    assert np.abs(sent - np.asarray(want)).max() < 0.15
    starts = np.asarray(res["start_times"])
    assert np.abs(starts - np.asarray(want)).max() < 0.15 and res["request_rate"] == rate


def test_max_concurrency(fake: Any, tmp_path: Path) -> None:
    srv = fake(ttft_s=0.04, itl_s=0.01)
    flags = "--num-prompts 12 --random-input-len 8 --random-output-len 3 --max-concurrency 3"
    res = _bench(srv, tmp_path / "conc.json", flags)
    assert srv.peak == 3 and res["max_concurrency"] == 3 and res["completed"] == 12
    assert res["peak_concurrent_requests"] <= 3


def test_failed_requests_counted(fake: Any, tmp_path: Path) -> None:
    srv = fake(fail_every=4)  # the test request is #0; #3, #7 and #11 fail
    flags = "--num-prompts 12 --random-input-len 8 --random-output-len 2 --max-concurrency 1"
    res = _bench(srv, tmp_path / "fail.json", flags)
    assert res["completed"] == 9 and res["failed"] == 3 and len(res["errors"]) == 3
    assert all(e.startswith("HTTP 500") and "injected failure" in e for e in res["errors"])
    assert res["error_counts"] == {"HTTP 500": 3} and res["total_output_tokens"] == 18
    assert sum(t is None for t in res["ttfts"]) == 3
    assert "HTTP 500 x3" in (tmp_path / "fail.md").read_text()


def test_chat_endpoint_without_usage(fake: Any, tmp_path: Path, tiny_tokenizer: Any) -> None:
    srv = fake(ttft_s=0.05, send_usage=False)
    flags = "--endpoint /v1/chat/completions --num-prompts 3 --random-input-len 10"
    flags += f" --random-output-len 4 --model {MODEL} --tokenizer {srv.tokenizer_root}"
    res = _bench(srv, tmp_path / "chat.json", flags + " --percentile-metrics ttft,e2el")
    assert res["completed"] == 3 and res["backend"] == "openai-chat"
    assert res["mean_ttft_ms"] >= 45  # the role chunk at once is not the first token
    text = " w0 w1 w2 w3"
    assert res["generated_texts"] == [text] * 3
    n_tok = len(tiny_tokenizer(text, add_special_tokens=False).input_ids)
    assert res["output_lens"] == [n_tok] * 3
    msg = srv.bodies[-1]["messages"]
    assert msg[0]["role"] == "user" and isinstance(msg[0]["content"], str)
    assert srv.bodies[-1]["max_completion_tokens"] == 4


def test_unreachable_server_and_bad_args(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again before the client connects
    base = ["bench", "serve", "--host", "127.0.0.1", "--port", str(port), *_TIMEOUT]
    assert main([*base, "--num-prompts", "2"]) == 1
    assert main([*base, "--request-rate", "0"]) == 1
    assert main([*base, "--percentile-metrics", "ttft,bogus"]) == 1
    assert main([*base, "--endpoint", "/v1/embeddings", "--model", "m"]) == 1


def test_arrival_offsets_and_helpers(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    assert arrival_offsets(4, float("inf"), 1.0, 0) == [0.0] * 4
    a = arrival_offsets(20001, 5.0, 1.0, 0)
    assert a == arrival_offsets(20001, 5.0, 1.0, 0) != arrival_offsets(20001, 5.0, 1.0, 1)
    gaps = np.diff(a)
    assert abs(gaps.mean() - 0.2) < 0.006 and abs(gaps.std() / gaps.mean() - 1.0) < 0.03
    bursty = np.diff(arrival_offsets(20001, 5.0, 4.0, 0))
    assert abs(bursty.mean() - 0.2) < 0.006 and abs(bursty.std() / bursty.mean() - 0.5) < 0.03
    assert peak_concurrency([(0, 2), (1, 3), (2, 4), (5, 6)]) == 2
    tok = str(tiny_tokenizer_dir)
    assert resolve_tokenizer("explicit", [tok]) == "explicit"
    assert resolve_tokenizer(None, ["served-name", tok]) == tok
    with pytest.raises(ValueError, match="--tokenizer"):
        resolve_tokenizer(None, ["served-name", str(tmp_path), None])


def test_against_real_server(llama_dir: Path, tmp_path: Path) -> None:
    """``build_app`` (tiny llama, CPU) under uvicorn in a thread; 8 requests per endpoint."""
    import uvicorn

    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.entrypoints.openai.api_server import build_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    engine = AsyncLLM.from_config(
        EngineConfig(model=str(llama_dir), device="cpu", max_model_len=256)
    )
    app = build_app(engine, argparse.Namespace(disable_log_requests=True))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.02)
        assert server.started, "uvicorn did not start"
        base = ["bench", "serve", "--port", str(port), *_TIMEOUT, "--num-prompts", "8"]
        base += ["--random-input-len", "24", "--random-output-len", "6", "--ignore-eos"]
        base += ["--request-rate", "40", "--max-concurrency", "6"]
        for name, endpoint in (("cmpl", "/v1/completions"), ("chat", "/v1/chat/completions")):
            out = tmp_path / f"{name}.json"
            argv = [*base, "--endpoint", endpoint, "--save-result"]
            argv += ["--result-dir", str(tmp_path), "--result-filename", out.name]
            assert main(argv) == 0
            res = json.loads(out.read_text())
            assert res["completed"] == 8 and res["failed"] == 0, res["errors"]
            assert res["output_lens"] == [6] * 8 and res["model_id"] == str(llama_dir)
            assert res["tokenizer_id"] == str(llama_dir) and res["server_version"]
            assert res["server_max_model_len"] == 256 and res["mean_ttft_ms"] > 0
            assert res["mean_tpot_ms"] > 0 and res["median_e2el_ms"] >= res["median_ttft_ms"]
            assert res["peak_concurrent_requests"] <= 6
            if name == "cmpl":
                assert res["total_input_tokens"] == 8 * 24
    finally:
        server.should_exit = True
        thread.join(30)
        if engine.is_running:
            engine.shutdown()


def test_structured_output_ratio(fake: Any, tmp_path: Path) -> None:
    """Half the requests carry the ticket schema as response_format; the report gives each
    group's metrics apart."""
    srv = fake()
    flags = "--num-prompts 8 --random-input-len 12 --random-output-len 4 --ignore-eos "
    flags += "--structured-output ticket --structured-output-ratio 0.5 --seed 3"
    res = _bench(srv, tmp_path / "so.json", flags)
    formats = [b.get("response_format") for b in srv.bodies[-8:]]  # the measured requests
    assert sum(f is not None for f in formats) == 4
    assert all(f["json_schema"]["schema"]["required"][0] == "customer" for f in formats if f)
    groups = res["groups"]
    assert groups["constrained"]["completed"] == groups["free"]["completed"] == 4
    assert groups["free"]["median_tpot_ms"] >= 0
    everything = _bench(srv, tmp_path / "all.json", flags.replace("0.5", "1"))
    assert "groups" not in everything
    assert all(b.get("response_format") for b in srv.bodies[-8:])


def test_structured_output_new_schema_per_request(fake: Any, tmp_path: Path) -> None:
    """ticket-new: every request's schema differs from every other's (so a server compiles
    each one), and each is still the ticket schema."""
    srv = fake()
    flags = "--num-prompts 6 --random-input-len 12 --random-output-len 4 --ignore-eos "
    _bench(srv, tmp_path / "new.json", flags + "--structured-output ticket-new")
    schemas = [b["response_format"]["json_schema"]["schema"] for b in srv.bodies[-6:]]
    assert len({json.dumps(s, sort_keys=True) for s in schemas}) == 6
    assert all(set(s["required"]) == set(TICKET_SCHEMA["required"]) for s in schemas)
