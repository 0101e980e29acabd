"""Hub ids as model / tokenizer names: resolved from a pre-filled cache under HF_HUB_OFFLINE=1.

The cache is built in huggingface_hub's layout (``hub_cache.py``); nothing here reaches the
network: offline mode makes huggingface_hub refuse every HTTP request.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import pytest

from pagedllm.config import DEMO_MODEL_DIR, EngineConfig
from pagedllm.config.hub import looks_like_repo_id
from tests.config.hub_cache import fill_hub_cache


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def cache(tmp_path: Path, make_arch_dir: Callable[..., str]) -> Path:
    """A cache holding ``org/tiny`` at ``main`` (context 256) and at tag ``v1`` (context 128)."""
    root = tmp_path / "hub"
    fill_hub_cache(root, "org/tiny", Path(make_arch_dir()))
    fill_hub_cache(root, "org/tiny", Path(make_arch_dir(max_position_embeddings=128)), "v1")
    return root


def test_the_cache_layout_is_huggingface_hubs(cache: Path) -> None:
    info = huggingface_hub.scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == "org/tiny" and len(repo.revisions) == 2
    assert {ref for r in repo.revisions for ref in r.refs} == {"main", "v1"}


@pytest.mark.usefixtures("offline")
def test_hub_id_loads_from_the_cache(cache: Path) -> None:
    cfg = EngineConfig(model="org/tiny", download_dir=str(cache), device="cpu")
    model_dir = Path(cfg.model_config.model)
    assert model_dir.parent.parent == cache / "models--org--tiny"
    assert model_dir.parent.name == "snapshots" and (model_dir / "config.json").is_file()
    assert cfg.model_config.tokenizer == str(model_dir)
    assert cfg.model_config.max_model_len == 256
    # The engine process rebuilds the config from to_kwargs(): a directory, no hub again.
    again = EngineConfig(**cfg.to_kwargs())
    assert again.model_config.model == str(model_dir)


@pytest.mark.usefixtures("offline")
def test_revisions(cache: Path) -> None:
    v1 = EngineConfig(model="org/tiny", revision="v1", download_dir=str(cache), device="cpu")
    assert v1.model_config.max_model_len == 128
    main = EngineConfig(model="org/tiny", download_dir=str(cache), device="cpu")
    assert v1.model_config.model != main.model_config.model
    # The tokenizer from another revision of the same repository.
    tok = EngineConfig(
        model="org/tiny", tokenizer_revision="v1", download_dir=str(cache), device="cpu"
    )
    assert (tok.model_config.model, tok.model_config.tokenizer) == (
        main.model_config.model,
        v1.model_config.model,
    )
    # A tokenizer given as a hub id.
    cfg = EngineConfig(
        model=str(DEMO_MODEL_DIR), tokenizer="org/tiny", download_dir=str(cache), device="cpu"
    )
    assert cfg.model_config.tokenizer == main.model_config.model
    with pytest.raises(ValueError, match="at revision 'v2' is not in .*HF_HUB_OFFLINE is set"):
        EngineConfig(model="org/tiny", revision="v2", download_dir=str(cache))


@pytest.mark.usefixtures("offline")
def test_offline_and_not_cached_is_a_clear_error(cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        EngineConfig(model="Qwen/Qwen2.5-0.5B-Instruct", download_dir=str(cache))
    msg = str(info.value)
    assert "'Qwen/Qwen2.5-0.5B-Instruct' is not in" in msg and str(cache) in msg
    assert "HF_HUB_OFFLINE is set" in msg and "hf download Qwen/Qwen2.5-0.5B-Instruct" in msg
    # The standard cache ($HF_HUB_CACHE) when no --download-dir is given.
    with pytest.raises(ValueError, match="not in the Hugging Face cache"):
        EngineConfig(model="org/missing")


def test_the_standard_cache_is_used_without_download_dir(
    cache: Path, offline: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    cfg = EngineConfig(model="org/tiny", device="cpu")
    assert Path(cfg.model_config.model).is_relative_to(cache)


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"revision": "v1"}, "revision='v1' applies to Hugging Face hub ids, but the model"),
        ({"tokenizer_revision": "v1"}, "tokenizer_revision='v1' applies to Hugging Face hub"),
        ({"revision": " "}, "revision must not be empty"),
    ],
)
def test_revisions_of_local_directories_are_errors(
    kw: dict[str, str], needle: str, arch_dir: str
) -> None:
    with pytest.raises(ValueError, match=needle):
        EngineConfig(model=arch_dir, **kw)


def test_names_that_are_neither(tmp_path: Path) -> None:
    other = tmp_path / "model.bin"  # a file is ModelConfig's to judge (a .gguf is a model)
    other.write_bytes(b"x")
    with pytest.raises(ValueError, match="is not a local directory"):
        EngineConfig(model=str(other))
    with pytest.raises(ValueError, match="revision='main' applies to Hugging Face hub ids"):
        EngineConfig(model=str(other), revision="main")
    with pytest.raises(ValueError, match="not a local directory and not a Hugging Face hub id"):
        EngineConfig(model="no such/dir here")
    with pytest.raises(ValueError, match="revision needs a hub model id"):
        EngineConfig(revision="main")


@pytest.mark.parametrize(
    "name,ok",
    [
        ("gpt2", True),
        ("Qwen/Qwen2.5-0.5B-Instruct", True),
        ("meta-llama/Llama-3.1-8B_x", True),
        ("./model", False),
        ("/abs/path", False),
        ("a/b/c", False),
        ("a..b/c", False),
        ("with space", False),
        ("", False),
    ],
)
def test_repo_id_spelling(name: str, ok: bool) -> None:
    assert looks_like_repo_id(name) is ok


def test_config_json_is_read_from_the_snapshot(cache: Path, offline: None) -> None:
    cfg = EngineConfig(model="org/tiny", revision="v1", download_dir=str(cache), device="cpu")
    raw = json.loads((Path(cfg.model_config.model) / "config.json").read_text())
    assert raw["max_position_embeddings"] == 128 == cfg.model_config.arch.max_position_embeddings
