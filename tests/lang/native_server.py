"""Real HTTP servers for the native-route and ``pagedllm.lang`` tests.

``serve_in_thread``: ``build_app`` (which registers the native routes) around a started
``AsyncLLM`` (its own engine process), under uvicorn in a thread on a free loopback port.
``serve_subprocess``: the ``pagedllm serve`` command line in a process of its own.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ThreadServer:
    base_url: str
    api_key: str | None
    app: Any = None  # the FastAPI app, when it runs in this process

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@contextmanager
def serve_in_thread(
    model_dir: Path, api_key: str | None = None, max_model_len: int = 512, **flags: Any
) -> Iterator[ThreadServer]:
    import uvicorn

    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_llm import AsyncLLM
    from pagedllm.entrypoints.openai.api_server import build_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    engine = AsyncLLM.from_config(
        EngineConfig(model=str(model_dir), device="cpu", max_model_len=max_model_len)
    )
    args = argparse.Namespace(
        disable_log_requests=True, api_key=[api_key] if api_key else None, **flags
    )
    app = build_app(engine, args)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.02)
        assert server.started, "uvicorn did not start"
        yield ThreadServer(f"http://127.0.0.1:{port}", api_key, app)
    finally:
        server.should_exit = True
        thread.join(30)
        if engine.is_running:
            engine.shutdown()
        sock.close()


@contextmanager
def serve_subprocess(
    model_dir: Path, log_path: Path, api_key: str | None = None, *flags: str
) -> Iterator[ThreadServer]:
    """A ``pagedllm serve`` process (its own session) on a free loopback port."""
    import os
    import signal
    import subprocess
    import sys

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    cmd = [sys.executable, "-m", "pagedllm.entrypoints.cli", "serve", str(model_dir)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--uvicorn-log-level", "warning"]
    cmd += ["--max-model-len", "512", *flags]
    if api_key:
        cmd += ["--api-key", api_key]
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    env.pop("PAGEDLLM_API_KEY", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"pagedllm serve exited:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"pagedllm serve did not start:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield ThreadServer(f"http://127.0.0.1:{port}", api_key)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
