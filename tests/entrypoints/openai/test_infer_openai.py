"""``pagedllm infer --backend openai`` against a real server equals the in-process engine, and
``pagedllm chat --base-url`` streams from it (same greedy text as in process)."""

from __future__ import annotations

import json
from pathlib import Path

from pagedllm.config import EngineConfig
from pagedllm.entrypoints.chat_backends import LocalBackend, RemoteBackend, Sampling
from pagedllm.entrypoints.cli import main
from tests.entrypoints.openai.conftest import API_KEY, MAX_MODEL_LEN, MODEL_NAME, ServerProc


def test_openai_backend_matches_pagedllm(
    server: ServerProc, llama_dir: Path, tmp_path: Path
) -> None:
    dataset = tmp_path / "in.jsonl"
    rows = [{"prompt": "hello"}, {"messages": [{"role": "user", "content": "hi"}]}]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    flags = ["--max-tokens", "12", "--device", "cpu", "--max-model-len", str(MAX_MODEL_LEN)]
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    assert (
        main(["infer", str(llama_dir), "--dataset", str(dataset), "--output", str(local), *flags])
        == 0
    )
    argv = ["infer", str(llama_dir), "--dataset", str(dataset), "--output", str(remote)]
    argv += ["--backend", "openai", "--base-url", server.base_url, "--api-key", API_KEY]
    assert main([*argv, *flags]) == 0
    assert main(["infer", "--compare", str(local), str(remote)]) == 0
    got = [json.loads(line) for line in remote.read_text().splitlines()]
    assert all(r["usage"]["completion_tokens"] == 12 for r in got)


def test_chat_against_the_server(server: ServerProc, llama_dir: Path) -> None:
    msgs = [{"role": "user", "content": "hello"}]
    sampling = Sampling(temperature=0.0, max_tokens=10)
    remote = RemoteBackend(server.base_url, None, API_KEY)
    try:
        assert remote.model == MODEL_NAME  # the server's first model
        text = "".join(remote.stream(msgs, sampling))
        assert remote.last_usage.completion_tokens == 10
    finally:
        remote.close()
    config = EngineConfig(model=str(llama_dir), device="cpu", max_model_len=MAX_MODEL_LEN)
    local = LocalBackend(config)
    assert "".join(local.stream(msgs, sampling)) == text
