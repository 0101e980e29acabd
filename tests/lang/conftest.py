"""Backends shared by the ``pagedllm.lang`` tests: the tiny llama in-process, and the same
model behind a real server (``native_server.py``) for ``Endpoint`` / ``OpenAIBackend``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedllm import lang
from tests.lang.native_server import ThreadServer, serve_in_thread

API_KEY = "sk-lang"


@pytest.fixture(scope="session")
def local(llama_dir: Path) -> Iterator[lang.LocalBackend]:
    backend = lang.LocalBackend(str(llama_dir), device="cpu", max_model_len=512)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def lang_server(llama_dir: Path) -> Iterator[ThreadServer]:
    with serve_in_thread(llama_dir, api_key=API_KEY, served_model_name=["tiny"]) as s:
        yield s


@pytest.fixture(scope="session")
def endpoint(lang_server: ThreadServer) -> Iterator[lang.Endpoint]:
    backend = lang.Endpoint(lang_server.base_url, api_key=API_KEY)
    yield backend
    backend.close()
