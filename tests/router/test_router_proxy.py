"""``pagedllm router`` as a real process in front of two real ``pagedllm serve`` workers.

Answers through the router equal the workers' own (streaming included), a shared prefix stays
on one worker, 4xx answers pass through, a killed worker's requests are retried on the other
before any byte was sent, a silent worker leaves rotation and re-enters it once its /health
passes again, and a data-parallel worker (``-dp 2``) stops with both its engines on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.entrypoints.openai.conftest import MODEL_NAME, ServerProc, free_port, launch

_REPO_ROOT = Path(__file__).resolve().parents[2]
_START_S = 120.0


def start_router(*args: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "router", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), *args]
    env = dict(os.environ, PYTHONPATH=str(_REPO_ROOT))
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(log.read_text())


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("router_logs")


@pytest.fixture(scope="module")
def workers(llama_dir: Path, logs: Path) -> Iterator[list[ServerProc]]:
    # w0 is itself data-parallel (two engine processes): the router sees one worker.
    procs = [launch("w0", llama_dir, logs, "-dp", "2"), launch("w1", llama_dir, logs)]
    try:
        for p in procs:
            p.wait_ready(time.monotonic() + _START_S)
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait_stopped()


@pytest.fixture(scope="module")
def router(workers: list[ServerProc], logs: Path) -> Iterator[str]:
    urls = [w.base_url for w in workers]
    args = [
        "--worker-urls",
        *urls,
        "--health-check-interval",
        "0.3",
        "--health-check-timeout",
        "1.0",
    ]
    proc, url = start_router(*args, log=logs / "r.log")
    yield url
    stop(proc)


def workers_view(router: str) -> dict[str, dict]:
    return {w["url"]: w for w in httpx.get(f"{router}/workers").json()}


def body(prompt: str, **kw: object) -> dict:
    return {"model": MODEL_NAME, "prompt": prompt, "max_tokens": 6, "temperature": 0, **kw}


def test_answers_equal_the_workers(router: str, workers: list[ServerProc]) -> None:
    direct = httpx.post(
        f"{workers[0].base_url}/v1/completions", json=body("Hello there"), timeout=60
    )
    via = httpx.post(f"{router}/v1/completions", json=body("Hello there"), timeout=60)
    assert via.status_code == 200 and via.json()["choices"] == direct.json()["choices"]
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
    r = httpx.post(f"{router}/v1/chat/completions", json={**chat, "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    models = httpx.get(f"{router}/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]


def test_streaming_through_the_router(router: str, workers: list[ServerProc]) -> None:
    direct = httpx.post(f"{workers[1].base_url}/v1/completions", json=body("Once upon"), timeout=60)
    pieces: list[str] = []
    with httpx.stream(
        "POST", f"{router}/v1/completions", json=body("Once upon", stream=True), timeout=60
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        pieces += [c["text"] for c in json.loads(line[6:])["choices"]]
    assert len(pieces) > 1 and "".join(pieces) == direct.json()["choices"][0]["text"]


def test_a_shared_prefix_stays_on_one_worker(router: str) -> None:
    before = {u: w["routed"] for u, w in workers_view(router).items()}
    system = "You are a terse assistant. Answer with one word only, please. " * 4
    for i in range(6):
        r = httpx.post(
            f"{router}/v1/completions", json=body(f"{system}Q{i}?", max_tokens=1), timeout=60
        )
        assert r.status_code == 200
    after = {u: w["routed"] for u, w in workers_view(router).items()}
    assert sorted(after[u] - before[u] for u in after) == [0, 6]


def test_client_errors_pass_through(router: str) -> None:
    r = httpx.post(f"{router}/v1/completions", json={**body("x"), "model": "nope"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_silent_worker_leaves_rotation_and_rejoins(
    router: str, workers: list[ServerProc]
) -> None:
    stopped = workers[0]
    os.kill(stopped.proc.pid, signal.SIGSTOP)  # alive, but /health no longer answers
    try:
        _until(lambda: not workers_view(router)[stopped.base_url]["healthy"])
        before = workers_view(router)[workers[1].base_url]["routed"]
        for i in range(2):
            r = httpx.post(f"{router}/v1/completions", json=body(f"while stopped {i}"), timeout=60)
            assert r.status_code == 200
        assert workers_view(router)[workers[1].base_url]["routed"] == before + 2
    finally:
        os.kill(stopped.proc.pid, signal.SIGCONT)
    _until(lambda: workers_view(router)[stopped.base_url]["healthy"])


def test_a_killed_worker_is_retried_elsewhere(workers: list[ServerProc], logs: Path) -> None:
    # A router that does not health-check again: the dead worker stays in its rotation until
    # a request finds it dead, is retried on the other worker, and takes it out.
    urls = [w.base_url for w in workers]
    args = ["--worker-urls", *urls, "--policy", "round_robin", "--health-check-interval", "3600"]
    lazy, lazy_url = start_router(*args, log=logs / "lazy.log")
    try:
        victim = workers[1]
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        for i in range(4):
            r = httpx.post(f"{lazy_url}/v1/completions", json=body(f"retry {i}"), timeout=60)
            assert r.status_code == 200, r.text
        view = workers_view(lazy_url)
        assert not view[victim.base_url]["healthy"] and view[victim.base_url]["last_error"]
        assert view[workers[0].base_url]["routed"] == 4
    finally:
        stop(lazy)


def test_a_data_parallel_worker_stops_cleanly(workers: list[ServerProc]) -> None:
    """SIGTERM: both engine processes stop with the server, exit status 0."""
    w = workers[0]
    pids = [p for p in w.engine_pids() if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(pids) == 2
    w.terminate()
    assert w.proc.wait(30) == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()


def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_no_healthy_worker_is_an_openai_503(logs: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    port = free_port()
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "router", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--worker-urls", dead]
    env = dict(os.environ, PYTHONPATH=str(_REPO_ROOT))
    with open(logs / "dead.log", "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                health = httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert health.status_code == 503
        r = httpx.post(f"{url}/v1/completions", json=body("x"), timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_worker"
    finally:
        stop(proc)
