"""``pagedllm serve -dp 2``: one real server process, two engine processes (CPU, tiny model).

Greedy completions equal the offline engine's; requests sharing a long prefix land on one
replica (``/metrics``: ``pagedllm:router_requests{engine=...}``); a killed replica leaves the
server serving on the other (``pagedllm:engine_up`` 0), and SIGTERM then stops everything,
exit status 1, no engine process left behind.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pagedllm import LLM, SamplingParams
from tests.entrypoints.openai.conftest import MAX_MODEL_LEN, MODEL_NAME, ServerProc, launch

_STARTUP_S = 120.0


@pytest.fixture(scope="module")
def dp_server(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    server = launch("dp2", llama_dir, tmp_path_factory.mktemp("dp_logs"), "-dp", "2")
    try:
        server.wait_ready(time.monotonic() + _STARTUP_S)
        yield server
    finally:
        server.terminate()
        server.wait_stopped()


def replica_pids(server: ServerProc) -> list[int]:
    """The server's engine processes (spawned children; not multiprocessing's helpers)."""
    pids = []
    for pid in server.engine_pids():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"spawn_main" in cmdline:
            pids.append(pid)
    return pids


def per_engine(server: ServerProc, metric: str) -> dict[str, float]:
    text = httpx.get(f"{server.base_url}/metrics").text
    out = {}
    for m in re.finditer(
        rf'^{re.escape(metric)}\{{[^}}]*engine="(\d+)"[^}}]*\}} (\S+)$', text, re.M
    ):
        out[m[1]] = float(m[2])
    return out


def complete(server: ServerProc, prompt: str, max_tokens: int = 8) -> str:
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def test_greedy_text_equals_one_engine(dp_server: ServerProc, llama_dir: Path) -> None:
    assert len(replica_pids(dp_server)) == 2
    prompts = [
        f"Story {i}: once upon a time there was a {w}"
        for i, w in enumerate(["cat", "dog", "owl", "fox"])
    ]
    llm = LLM(str(llama_dir), max_model_len=MAX_MODEL_LEN)
    ref = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    for prompt, want in zip(prompts, ref, strict=True):
        assert complete(dp_server, prompt) == want.outputs[0].text
    routed = per_engine(dp_server, "pagedllm:router_requests_total")
    assert set(routed) == {"0", "1"} and sum(routed.values()) >= 4
    assert per_engine(dp_server, "pagedllm:engine_up") == {"0": 1.0, "1": 1.0}


def test_a_shared_prefix_stays_on_one_replica(dp_server: ServerProc) -> None:
    before = per_engine(dp_server, "pagedllm:router_requests_total")
    hits0 = per_engine(dp_server, "pagedllm:prefix_cache_hits_total")
    system = "You are a careful assistant who answers in full sentences. " * 6
    for i in range(6):
        complete(dp_server, f"{system}Question {i}: what is {i} plus {i}?", max_tokens=2)
    after = per_engine(dp_server, "pagedllm:router_requests_total")
    deltas = sorted(after[k] - before.get(k, 0.0) for k in after)
    assert deltas == [0.0, 6.0]
    hits = per_engine(dp_server, "pagedllm:prefix_cache_hits_total")
    busy = max(after, key=lambda k: after[k] - before.get(k, 0.0))
    assert hits[busy] - hits0[busy] >= 5 * 64  # the shared prefix: several full blocks, 5 times


def test_a_dead_replica_then_sigterm(dp_server: ServerProc) -> None:
    pids = replica_pids(dp_server)
    os.kill(pids[1], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while per_engine(dp_server, "pagedllm:engine_up").get("1") != 0.0:
        assert time.monotonic() < deadline, "the death was not noticed"
        time.sleep(0.05)
    for i in range(4):  # every request lands on the survivor
        assert complete(dp_server, f"after the death {i}", max_tokens=2)
    assert httpx.get(f"{dp_server.base_url}/health").status_code == 200
    assert "replica 1" in dp_server.log() or "Engine is dead" in dp_server.log()
    dp_server.terminate()
    assert dp_server.proc.wait(30) == 1  # an engine died before shutdown was asked for
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


@pytest.mark.parametrize(
    "argv", [["--router-policy", "round_robin"], ["--router-balance-abs-threshold", "8"]]
)
def test_routing_flags_need_replicas(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from pagedllm.entrypoints.cli import main

    assert main(["serve", *argv]) == 1
    assert (
        f"{argv[0]} routes over data-parallel replicas; it needs -dp > 1."
        in capsys.readouterr().err
    )
    assert main(["serve", "-dp", "2", "--router-cache-threshold", "1.5"]) == 1
    assert "cache_threshold must be in [0, 1], got 1.5" in capsys.readouterr().err
