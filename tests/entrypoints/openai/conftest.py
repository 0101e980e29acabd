"""Real ``pagedllm serve`` subprocesses on loopback for the OpenAI server tests.

``servers`` (package scope) starts, concurrently, the three servers every test module uses:

* ``main``: the tiny llama model behind ``--api-key``, a 1 MB body limit and max_model_len 512;
* ``drain``: ``--max-num-seqs 1 --max-waiting-requests 1 --queue-timeout 0.5`` for the
  queue-full, queue-timeout and SIGTERM tests;
* ``doomed``: a server whose engine process the lifecycle tests kill;
* ``guarded``: JWT + API keys, rate limits, ``--max-seqs-per-request 8``, short header/body/
  request timeouts and ``--max-num-seqs 2`` for the hardening tests;
* ``wedged``: ``--engine-health-timeout 1`` for the SIGSTOP and process-group SIGTERM tests.

Every server runs in its own session (process group), as under systemd.

Each logs to a file (``ServerProc.log_path``) so tests can read the JSON request lines.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

API_KEY = "sk-test-key"
GUARDED_KEYS = ("sk-guarded-1", "sk-guarded-2")
JWT_SECRET = "test-secret-0123456789-0123456789"
JWT_AUDIENCE = "pagedllm-tests"
GUARDED_RPM = 6
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 512
MAX_BODY_BYTES = 1_000_000
_STARTUP_TIMEOUT_S = 120.0
_REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass
class ServerProc:
    """One server subprocess."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    api_key: str | None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def engine_pids(self) -> list[int]:
        """Direct children of the server process (the engine process)."""
        pids: list[int] = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            children = (task / "children").read_text().split()
            pids.extend(int(c) for c in children)
        return pids

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited early:\n{self.log()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/health", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"server {self.name} did not start:\n{self.log()[-4000:]}")

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self) -> None:
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    name: str, model_dir: Path, log_dir: Path, *extra: str, api_key: str | None = None
) -> ServerProc:
    port = free_port()
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--served-model-name", MODEL_NAME]
    cmd += ["--max-model-len", str(MAX_MODEL_LEN), "--uvicorn-log-level", "warning", *extra]
    if api_key:
        cmd += ["--api-key", api_key]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
    env.pop("PAGEDLLM_API_KEY", None)
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return ServerProc(name, proc, port, log_path, api_key)


@pytest.fixture(scope="package")
def servers(
    llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, ServerProc]]:
    log_dir = tmp_path_factory.mktemp("server_logs")
    procs = {
        "main": launch(
            "main",
            llama_dir,
            log_dir,
            "--max-request-body-bytes",
            str(MAX_BODY_BYTES),
            api_key=API_KEY,
        ),
        "drain": launch(
            "drain",
            llama_dir,
            log_dir,
            "--max-num-seqs",
            "1",
            "--max-waiting-requests",
            "1",
            "--drain-timeout",
            "30",
            "--queue-timeout",
            "0.5",
            "--max-model-len",
            "1024",
        ),
        "doomed": launch("doomed", llama_dir, log_dir),
        "guarded": launch(
            "guarded",
            llama_dir,
            log_dir,
            *("--api-key", GUARDED_KEYS[0], "--api-key", GUARDED_KEYS[1]),
            *("--jwt-secret", JWT_SECRET, "--jwt-audience", JWT_AUDIENCE),
            *("--rate-limit-requests-per-minute", str(GUARDED_RPM)),
            *("--rate-limit-tokens-per-minute", "100000"),
            *("--max-seqs-per-request", "8", "--max-num-seqs", "2"),
            *("--header-read-timeout", "1", "--body-read-timeout", "1"),
            *("--request-timeout", "1"),
        ),
        "wedged": launch("wedged", llama_dir, log_dir, "--engine-health-timeout", "1"),
    }
    try:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        for p in procs.values():
            p.wait_ready(deadline)
        yield procs
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait_stopped()


@pytest.fixture(scope="package")
def server(servers: dict[str, ServerProc]) -> ServerProc:
    return servers["main"]
