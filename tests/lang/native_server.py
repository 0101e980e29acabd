"""A real HTTP server for the native-route and ``pagedllm.lang`` tests: ``build_app`` plus
``register_native_routes`` around a started ``AsyncLLM`` (its own engine process), under
uvicorn in a thread on a free loopback port."""

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
    from pagedllm.entrypoints.openai.native_routes import register_native_routes

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
    register_native_routes(app, args)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.02)
        assert server.started, "uvicorn did not start"
        yield ThreadServer(f"http://127.0.0.1:{port}", api_key)
    finally:
        server.should_exit = True
        thread.join(30)
        if engine.is_running:
            engine.shutdown()
        sock.close()
