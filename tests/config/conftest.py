"""Fixtures of the config tests: model directories that hold only a ``config.json``.

A config reads nothing but ``config.json``, so these tests need no weights or tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ARCH: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 100,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
}


@pytest.fixture
def make_arch_dir(tmp_path: Path) -> Callable[..., str]:
    """``make(**overrides) -> str``: a fresh directory whose config.json is ``ARCH`` updated."""
    count = 0

    def make(**overrides: Any) -> str:
        nonlocal count
        count += 1
        path = tmp_path / f"model{count}"
        path.mkdir()
        (path / "config.json").write_text(json.dumps({**ARCH, **overrides}))
        return str(path)

    return make


@pytest.fixture
def arch_dir(make_arch_dir: Callable[..., str]) -> str:
    """A model directory with the plain ``ARCH`` (context limit 256)."""
    return make_arch_dir()
