"""vLLM's HTTP and logging flags on a real ``pagedllm serve``: TLS, CORS, the periodic stats log
line, ``--override-generation-config``, the new routes, a hub id served from a pre-filled cache
under ``HF_HUB_OFFLINE=1``; and the app-level flags (``--root-path``, ``--disable-fastapi-docs``)
on ``build_app``.

One server carries all of them (each server start costs seconds on the CI machine).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pagedllm.entrypoints.openai.stats_log import StatsLine
from tests.config.hub_cache import fill_hub_cache
from tests.entrypoints.openai.conftest import ServerProc, launch

ORIGIN = "https://chat.example"
ALIAS = "org/tiny-alias"


def _self_signed(dir: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = dir / "key.pem", dir / "cert.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class TLSServer:
    def __init__(self, proc: ServerProc, cert: Path) -> None:
        self.proc = proc
        self.url = f"https://127.0.0.1:{proc.port}"
        self.client = httpx.Client(
            base_url=self.url, verify=ssl.create_default_context(cafile=str(cert)), timeout=30
        )


@pytest.fixture(scope="module")
def tls(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSServer]:
    tmp = tmp_path_factory.mktemp("tls")
    key, cert = _self_signed(tmp)
    cache = tmp / "hub"
    fill_hub_cache(cache, "org/tiny-llama", llama_dir)
    extra = ["--ssl-keyfile", str(key), "--ssl-certfile", str(cert)]
    extra += ["--allowed-origins", f'["{ORIGIN}"]', "--allow-credentials"]
    extra += ["--log-stats-interval", "0.3", "--enable-tokenizer-info-endpoint"]
    extra += ["--override-generation-config", '{"temperature": 0}']
    extra += ["--served-model-name", "tiny", ALIAS, "--download-dir", str(cache)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        proc = launch("tls", Path("org/tiny-llama"), tmp, *extra, api_key="sk-tls")
    server = TLSServer(proc, cert)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{proc.log()[-4000:]}")
            try:
                if server.client.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)
        yield server
    finally:
        server.client.close()
        proc.terminate()
        proc.wait_stopped()


AUTH = {"Authorization": "Bearer sk-tls"}


def test_tls_only(tls: TLSServer) -> None:
    with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port is no answer
        httpx.get(f"http://127.0.0.1:{tls.proc.port}/health", timeout=5)
    with pytest.raises(httpx.ConnectError):  # an unknown certificate is refused by the client
        httpx.get(f"{tls.url}/health", timeout=5)


def test_cors_preflight_without_credentials(tls: TLSServer) -> None:
    headers = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    r = tls.client.options("/v1/chat/completions", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert r.headers["access-control-allow-credentials"] == "true"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    # Another origin is not allowed.
    r = tls.client.options("/v1/chat/completions", headers={**headers, "Origin": "https://evil"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    # A real cross-origin request (and its 401) carries the CORS header too.
    for auth in (AUTH, {}):
        r = tls.client.get("/v1/models", headers={"Origin": ORIGIN, **auth})
        assert r.headers["access-control-allow-origin"] == ORIGIN
    assert r.status_code == 401


def test_hub_id_served_and_model_routes(tls: TLSServer) -> None:
    cards = tls.client.get("/v1/models", headers=AUTH).json()["data"]
    assert [c["id"] for c in cards] == ["tiny", ALIAS]
    assert cards[0]["root"] == "org/tiny-llama"  # the hub id, not the cache path
    r = tls.client.get(f"/v1/models/{ALIAS}", headers=AUTH)
    assert r.status_code == 200 and r.json()["id"] == ALIAS and r.json()["max_model_len"] == 512
    r = tls.client.get("/v1/models/absent", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert tls.client.get("/v1/models/tiny").status_code == 401
    assert tls.client.get("/ping").status_code == 200
    log = tls.proc.log()  # start-up says what it loads at once, and when it is ready
    assert "Loading org/tiny-llama; the engine starts in its own process." in log
    assert re.search(r"Engine ready in [\d.]+ s; serving tiny, org/tiny-alias on ", log)
    info = tls.client.get("/tokenizer_info", headers=AUTH).json()
    assert info["model_max_length"] == 512 and info["vocab_size"] > 100
    assert info["eos_token"] in info["added_special_tokens"]


def test_override_generation_config_makes_requests_greedy(tls: TLSServer) -> None:
    body: dict[str, Any] = {"model": "tiny", "prompt": "hello", "max_tokens": 16}
    texts = set()
    for _ in range(3):  # no temperature in the request: the override's 0 applies
        r = tls.client.post("/v1/completions", json=body, headers=AUTH)
        assert r.status_code == 200, r.text
        texts.add(r.json()["choices"][0]["text"])
    greedy = tls.client.post("/v1/completions", json={**body, "temperature": 0}, headers=AUTH)
    assert texts == {greedy.json()["choices"][0]["text"]}
    hot = {**body, "temperature": 2.0, "n": 4}
    r = tls.client.post("/v1/completions", json=hot, headers=AUTH).json()
    assert len({c["text"] for c in r["choices"]}) > 1  # a request's own value still wins


def test_stats_log_line(tls: TLSServer) -> None:
    body = {"model": "tiny", "prompt": "stats", "max_tokens": 8}
    assert tls.client.post("/v1/completions", json=body, headers=AUTH).status_code == 200
    deadline = time.monotonic() + 10
    while "generation throughput" not in tls.proc.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [ln for ln in tls.proc.log().splitlines() if "Engine stats:" in ln]
    assert lines, tls.proc.log()[-2000:]
    assert "prompt throughput" in lines[0] and "KV cache usage" in lines[0]
    assert any("generation throughput 0.0 " not in ln for ln in lines)


def _stats(**kw: Any) -> Any:
    from pagedllm.engine.stats import EngineStats

    base = dict.fromkeys(f.name for f in __import__("dataclasses").fields(EngineStats))
    base.update({k: 0 for k in base})
    base["kv_cache_usage"] = 0.0
    base.update(kw)
    return EngineStats(**base)


def test_stats_line_rates_and_quiet_when_idle() -> None:
    line = StatsLine()
    assert line.line(_stats(), 0.0) is None  # the first snapshot only sets the baseline
    assert line.line(_stats(), 10.0) is None  # idle from the start: quiet
    busy = _stats(
        prompt_tokens_total=100,
        generation_tokens_total=50,
        num_running=2,
        kv_cache_usage=0.25,
        prefix_cache_queries=100,
        prefix_cache_hits=40,
    )
    text = line.line(busy, 20.0)
    assert text == (
        "Engine stats: prompt throughput 10.0 tokens/s, generation throughput 5.0 tokens/s, "
        "running 2, waiting 0, KV cache usage 25.0%, prefix cache hit rate 40.0%"
    )
    idle = _stats(
        prompt_tokens_total=100, generation_tokens_total=50, prefix_cache_queries=100,
        prefix_cache_hits=40,
    )  # fmt: skip
    assert line.line(idle, 30.0) is not None  # the line that says it went idle
    assert line.line(idle, 40.0) is None  # then quiet


class _FakeEngine:
    """What ``build_app`` reads from an engine before any request: enough for the app-level
    flags (no route below calls the engine)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.config = argparse.Namespace(model_config=argparse.Namespace(model="m"))
        self.input_processor = argparse.Namespace(max_model_len=64)
        self.is_running = False


def test_root_path_and_disabled_docs(tiny_tokenizer: Any) -> None:
    from fastapi.testclient import TestClient

    from pagedllm.entrypoints.cli import build_parser
    from pagedllm.entrypoints.openai.api_server import build_app
    from pagedllm.entrypoints.openai.cli_http import uvicorn_kwargs

    engine: Any = _FakeEngine(tiny_tokenizer)
    # No lifespan (no ``with``): the fake engine has no process to monitor.
    args = build_parser().parse_args(["serve", "--root-path", "/api"])
    assert uvicorn_kwargs(args)["root_path"] == "/api"  # uvicorn sets the ASGI root_path
    args.served_model_name = ["m"]
    client = TestClient(build_app(engine, args), root_path="/api")
    assert client.get("/openapi.json").json()["servers"] == [{"url": "/api"}]
    assert client.get("/v1/models/m").json()["id"] == "m"
    assert client.get("/docs").status_code == 200
    args = argparse.Namespace(served_model_name=["m"], disable_fastapi_docs=True)
    client = TestClient(build_app(engine, args))
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404, path
    assert client.get("/v1/models").status_code == 200


class _BusyEngine(_FakeEngine):
    """A fake engine whose stats show work on every read (so each interval logs a line)."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer)
        self.is_running = True
        self.reads = 0

    async def start_monitoring(self) -> None:
        pass

    async def get_stats(self) -> Any:
        self.reads += 1
        return _stats(generation_tokens_total=10 * self.reads, num_running=1)

    def shutdown(self) -> None:
        self.is_running = False


@pytest.mark.parametrize("disabled", [False, True])
def test_disable_log_stats(
    disabled: bool, tiny_tokenizer: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from fastapi.testclient import TestClient

    from pagedllm.entrypoints.openai.api_server import build_app

    engine: Any = _BusyEngine(tiny_tokenizer)
    args = argparse.Namespace(
        served_model_name=["m"], log_stats_interval=0.05, disable_log_stats=disabled
    )
    caplog.set_level("INFO", logger="pagedllm.stats")
    with TestClient(build_app(engine, args)):  # runs the lifespan
        time.sleep(0.5)
    lines = [r.getMessage() for r in caplog.records if r.name == "pagedllm.stats"]
    if disabled:
        assert not lines and engine.reads == 0
    else:
        assert len(lines) >= 3 and "running 1" in lines[-1]


def test_root_path_keeps_probes_open(tiny_tokenizer: Any) -> None:
    """Behind --root-path the probes stay open and everything else still needs the key (the
    gate compares the route's path, not the request path carrying the root path)."""
    from fastapi.testclient import TestClient

    from pagedllm.entrypoints.cli import build_parser
    from pagedllm.entrypoints.openai.api_server import build_app

    engine: Any = _FakeEngine(tiny_tokenizer)
    args = build_parser().parse_args(["serve", "--root-path", "/api", "--api-key", "k"])
    args.served_model_name = ["m"]
    client = TestClient(build_app(engine, args), root_path="/api")
    assert client.get("/ping").status_code != 401
    assert client.get("/v1/models").status_code == 401
    ok = client.get("/v1/models", headers={"Authorization": "Bearer k"})
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "m"


@pytest.mark.parametrize(("flag", "limit"), [(None, 20), ("25", 25), ("-1", 300)])
def test_max_logprobs_sets_the_limit(tiny_tokenizer: Any, flag: str | None, limit: int) -> None:
    """--max-logprobs is the most top alternatives a request may ask for (-1: the
    vocabulary); the checks run before the engine is asked anything."""
    from fastapi.testclient import TestClient

    from pagedllm.entrypoints.cli import build_parser
    from pagedllm.entrypoints.openai.api_server import build_app

    engine: Any = _FakeEngine(tiny_tokenizer)
    # Past the liveness and the input checks that come before the logprobs limit.
    engine.is_running, engine.is_wedged = True, lambda *a: False
    engine.input_processor = argparse.Namespace(
        max_model_len=64, vocab_size=300, check_priority=lambda p: None, in_vocab=lambda t: True
    )
    argv = ["serve"] + ([] if flag is None else ["--max-logprobs", flag])
    args = build_parser().parse_args(argv)
    args.served_model_name = ["m"]
    client = TestClient(build_app(engine, args))
    msgs = [{"role": "user", "content": "hi"}]
    bodies = [
        ("/v1/chat/completions", {"messages": msgs, "logprobs": True, "top_logprobs": limit + 1}),
        ("/v1/completions", {"prompt": "hi", "logprobs": limit + 1}),
    ]
    for path, body in bodies:
        r = client.post(path, json={"model": "m", **body})
        assert r.status_code == 400 and f"at most {limit}." in r.json()["error"]["message"], r.text
