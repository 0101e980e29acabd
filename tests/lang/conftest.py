"""Backends shared by the ``pagedllm.lang`` tests: the tiny llama in-process, and the same
model behind a real ``pagedllm serve`` process (``native_server.py``) for ``Endpoint``,
``OpenAIBackend`` and SGLang's own frontend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedllm import lang
from tests.lang.native_server import ThreadServer, serve_subprocess

API_KEY = "sk-lang"


@pytest.fixture(scope="session")
def local(llama_dir: Path) -> Iterator[lang.LocalBackend]:
    backend = lang.LocalBackend(str(llama_dir), device="cpu", max_model_len=512)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def lang_server(
    llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadServer]:
    """A real ``pagedllm serve`` process (with the native routes)."""
    log = tmp_path_factory.mktemp("lang_server") / "serve.log"
    with serve_subprocess(llama_dir, log, API_KEY, "--served-model-name", "tiny") as s:
        yield s


@pytest.fixture(scope="session")
def endpoint(lang_server: ThreadServer) -> Iterator[lang.Endpoint]:
    backend = lang.Endpoint(lang_server.base_url, api_key=API_KEY)
    yield backend
    backend.close()
