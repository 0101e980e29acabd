"""The same programs on every backend give the same text at temperature 0: in-process
(``LLM`` and ``AsyncLLM``), over HTTP through the native routes (``Endpoint``), and the
chat-only ``OpenAIBackend`` on our OpenAI route."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedllm import lang
from pagedllm.lang.state import ProgramState
from tests.lang.conftest import API_KEY
from tests.lang.native_server import ThreadServer


@lang.function
def multi_turn(s: ProgramState, q1: str, q2: str) -> None:
    s += lang.system("You are terse.")
    s += lang.user(q1)
    s += lang.assistant(lang.gen("a1", max_tokens=5))
    s += lang.user(q2)
    s += lang.assistant(lang.gen("a2", max_tokens=5))


@lang.function
def select_then_fork(s: ProgramState, topic: str) -> None:
    s += f"Topic: {topic}. Verdict:" + lang.select("verdict", choices=[" good", " bad", " fine"])
    s += "\nReasons:"
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f" ({i})" + lang.gen("reason", max_tokens=4, stop="\n")
    forks.join()
    s += " unconditional:" + lang.select(
        "u", choices=[" x", " yz"], choices_method="unconditional_normalized"
    )
    s += " greedy:" + lang.select("g", choices=[" one", " two"], choices_method="greedy")


def _snapshot(state: ProgramState) -> tuple[str, dict[str, object]]:
    return state.text(), state.variables()


@pytest.fixture(scope="module")
def async_backend(llama_dir: Path) -> Iterator[lang.LocalBackend]:
    from pagedllm.config import EngineConfig
    from pagedllm.engine.async_llm import AsyncLLM

    engine = AsyncLLM.from_config(
        EngineConfig(model=str(llama_dir), device="cpu", max_model_len=512)
    )
    backend = lang.LocalBackend(engine)
    yield backend
    backend.close()
    engine.shutdown()


def test_endpoint_roles_match_local(local: lang.LocalBackend, endpoint: lang.Endpoint) -> None:
    assert endpoint.role_template == local.role_template


@pytest.mark.parametrize("program", ["multi_turn", "select_then_fork"])
def test_same_text_on_every_backend(
    program: str,
    local: lang.LocalBackend,
    endpoint: lang.Endpoint,
    async_backend: lang.LocalBackend,
) -> None:
    if program == "multi_turn":
        runs = [
            multi_turn.run(q1="Hi", q2="And then?", backend=b, temperature=0)
            for b in (local, endpoint, async_backend)
        ]
    else:
        runs = [
            select_then_fork.run(topic="tests", backend=b, temperature=0)
            for b in (local, endpoint, async_backend)
        ]
    want = _snapshot(runs[0])
    assert len(want[0]) > 20
    for state in runs[1:]:
        assert _snapshot(state) == want


def test_endpoint_streams_and_batches(local: lang.LocalBackend, endpoint: lang.Endpoint) -> None:
    streamed = multi_turn.run(q1="Hi", q2="Why?", backend=endpoint, temperature=0, stream=True)
    pieces = list(streamed.text_iter())
    final = multi_turn.run(q1="Hi", q2="Why?", backend=local, temperature=0)
    assert "".join(pieces) == streamed.text() == final.text()
    batch = [{"q1": f"Q{i}", "q2": "ok"} for i in range(6)]
    over_http = multi_turn.run_batch(batch, backend=endpoint, temperature=0)
    in_process = multi_turn.run_batch(batch, backend=local, temperature=0)
    assert [s.text() for s in over_http] == [s.text() for s in in_process]


def test_openai_backend_chat_gen(local: lang.LocalBackend, lang_server: ThreadServer) -> None:
    backend = lang.OpenAIBackend("tiny", base_url=lang_server.base_url + "/v1", api_key=API_KEY)
    try:
        over_chat = multi_turn.run(q1="Hi", q2="More", backend=backend, temperature=0)
        in_process = multi_turn.run(q1="Hi", q2="More", backend=local, temperature=0)
        assert over_chat.messages() == in_process.messages()
        streamed = multi_turn.run(q1="Hi", q2="More", backend=backend, temperature=0, stream=True)
        assert "".join(streamed.text_iter("a2")) == in_process["a2"]

        @lang.function
        def pick(s: ProgramState) -> None:
            s += lang.user("Choose")
            s += lang.assistant(lang.select("c", choices=["a", "b"]))

        with pytest.raises(lang.ProgramError, match="cannot get from its server"):
            pick.run(backend=backend)

        @lang.function
        def with_top_k(s: ProgramState) -> None:
            s += lang.user("Hi")
            s += lang.assistant(lang.gen("x", max_tokens=2, top_k=5))

        with pytest.raises(lang.ProgramError, match="top_k"):
            with_top_k.run(backend=backend)

        @lang.function
        def outside(s: ProgramState) -> None:
            s += "plain text " + lang.gen("x", max_tokens=2)

        with pytest.raises(lang.ProgramError, match="assistant block"):
            outside.run(backend=backend)
    finally:
        backend.close()


def test_endpoint_reports_server_errors(lang_server: ThreadServer) -> None:
    with pytest.raises(RuntimeError, match="401"):
        lang.Endpoint(lang_server.base_url, api_key="wrong")


def test_endpoint_without_a_chat_template_uses_plain_roles(llama_dir: Path, tmp_path: Path) -> None:
    """A model whose tokenizer has no chat template (e.g. a bench preset's synthetic one):
    the Endpoint falls back to ``ROLE: text`` lines exactly as LocalBackend does, and a
    multi-turn program gives the same greedy text on both."""
    import json
    import shutil

    from tests.lang.native_server import serve_subprocess

    model = tmp_path / "no-template"
    shutil.copytree(llama_dir, model)
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    for extra in model.glob("chat_template.*"):
        extra.unlink()

    @lang.function
    def chat(s: ProgramState) -> None:
        s += lang.system("Be brief.")
        s += lang.user("Hi")
        s += lang.assistant(lang.gen("a", max_tokens=4))
        s += lang.user("More")
        s += lang.assistant(lang.gen("b", max_tokens=4))

    local = lang.LocalBackend(str(model), device="cpu", max_model_len=512)
    try:
        want = chat.run(backend=local, temperature=0)
        assert local.role_template == lang.roles.plain_role_template()
    finally:
        local.close()
    with serve_subprocess(model, tmp_path / "serve.log") as server:
        endpoint = lang.Endpoint(server.base_url)
        try:
            assert endpoint.role_template == local.role_template
            got = chat.run(backend=endpoint, temperature=0)
        finally:
            endpoint.close()
    assert got.text() == want.text()
