"""Shared pytest fixtures: tiny tokenizer / random-weight HF models, and the ``gpu`` marker.

Fixtures (all session-scoped, built once under ``tmp_path_factory``):

* ``tiny_tokenizer_dir`` -> ``Path`` of the trained byte-level BPE tokenizer.
* ``tiny_tokenizer`` -> that tokenizer loaded with ``transformers.AutoTokenizer``.
* ``tiny_models`` -> ``get(arch, **kw) -> Path``; builds each (arch, kw) variant once.
  ``kw`` are :func:`tests.fixtures.tiny_models.build_tiny_model` keyword arguments
  (``sharded``, ``tie_word_embeddings``, ``seed``, ``config_style``).
* ``tiny_model_dir`` -> ``Path``; the "llama" model unless parametrized indirectly, e.g.
  ``@pytest.mark.parametrize("tiny_model_dir", ARCHES, indirect=True)``.
* ``llama_dir`` -> ``Path`` of the plain "llama" model.

Tests marked ``@pytest.mark.gpu`` are skipped when CUDA is unavailable; on a GPU machine the
other tests see no CUDA (``_cpu_unless_gpu_marked``). Torch intra-op
threads are set to 1 for the session (tiny models only lose from threading); override with
the ``PAGEDLLM_TEST_TORCH_THREADS`` environment variable.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.tiny_models import build_tiny_model, build_tokenizer

TinyModelFactory = Callable[..., Path]


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``gpu`` marker and pin torch's CPU thread count."""
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU CI)")
    threads = os.environ.get("PAGEDLLM_TEST_TORCH_THREADS", "1")
    if threads:
        torch.set_num_threads(int(threads))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu``-marked tests when no CUDA device is available."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _cpu_unless_gpu_marked(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU machine, tests not marked ``gpu`` still run as on the CPU CI: device "auto"
    resolves to the CPU (fp32, so outputs can equal transformers' token for token), and no
    engine of theirs claims GPU memory that the next test's engine would need."""
    if "gpu" not in request.keywords and torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory holding the tiny trained tokenizer (tokenizer.json + tokenizer_config.json)."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> Any:
    """The tiny tokenizer loaded with ``transformers.AutoTokenizer``."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_models(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path
) -> TinyModelFactory:
    """Factory ``get(arch, **kw) -> Path`` building each model variant once per session."""
    built: dict[tuple[str, tuple[tuple[str, Any], ...]], Path] = {}

    def get(arch: str, **kw: Any) -> Path:
        key = (arch, tuple(sorted(kw.items())))
        path = built.get(key)
        if path is None:
            suffix = "-".join(f"{k}={v}" for k, v in key[1])
            name = f"tiny_{arch}" + (f"-{suffix}" if suffix else "")
            out = tmp_path_factory.mktemp(name)
            path = build_tiny_model(out, arch, tokenizer_dir=tiny_tokenizer_dir, **kw)
            built[key] = path
        return path

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(request: pytest.FixtureRequest, tiny_models: TinyModelFactory) -> Path:
    """A tiny model dir: "llama", or the arch given by indirect parametrization."""
    arch: str = getattr(request, "param", "llama")
    return tiny_models(arch)


@pytest.fixture(scope="session")
def llama_dir(tiny_models: TinyModelFactory) -> Path:
    """The plain tiny "llama" model directory."""
    return tiny_models("llama")
