"""SGLang's own frontend (``sgl.RuntimeEndpoint``), unmodified, against our server's native
routes: the same programs give the same text and variables as on ``pagedllm.lang`` at
temperature 0 (gen, select, fork, multi-turn roles, run_batch, streaming)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pagedllm import lang
from tests.lang.conftest import API_KEY
from tests.lang.native_server import ThreadServer
from tests.lang.sglang_frontend import load_sglang_frontend

TEMPLATE = "pagedllm-tiny"


@pytest.fixture(scope="module")
def sgl(local: lang.LocalBackend) -> Any:
    """SGLang's frontend, with the tiny model's chat template registered under ``TEMPLATE``
    (SGLang picks templates by model name and knows none for a test model)."""
    api = load_sglang_frontend()
    roles = local.role_template
    pairs = {r: (roles.prefix[r], roles.suffix[r]) for r in ("system", "user", "assistant")}
    api.register_chat_template(api.ChatTemplate(TEMPLATE, None, pairs))
    return api


@pytest.fixture(scope="module")
def runtime(sgl: Any, lang_server: ThreadServer) -> Any:
    return sgl.RuntimeEndpoint(lang_server.base_url, api_key=API_KEY, chat_template_name=TEMPLATE)


def _both(build: Callable[[Any], Callable[..., None]], sgl: Any) -> tuple[Any, Any]:
    """The same program body as an SGLang function and as a pagedllm.lang function."""
    return sgl.function(build(sgl)), lang.function(build(lang))


def _multi_turn(m: Any) -> Callable[..., None]:
    def multi_turn(s: Any, q1: str, q2: str) -> None:
        s += m.system("You are terse.")
        s += m.user(q1)
        s += m.assistant(m.gen("a1", max_tokens=6))
        s += m.user(q2)
        s += m.assistant(m.gen("a2", max_tokens=6, stop="\n"))

    return multi_turn


def _select_and_fork(m: Any) -> Callable[..., None]:
    def select_and_fork(s: Any, topic: str) -> None:
        s += "Topic: " + topic + ". Verdict:"
        s += m.select("verdict", choices=[" good", " bad", " unclear"])
        s += "\nDetails:"
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f" ({i})" + m.gen("detail", max_tokens=4)
        forks.join()
        s += " Done: " + forks[0]["detail"]

    return select_and_fork


def test_model_info_drives_the_frontend(runtime: Any) -> None:
    assert runtime.model_info["is_generation"] is True
    assert runtime.get_chat_template().name == TEMPLATE


def test_multi_turn_same_text(sgl: Any, runtime: Any, local: lang.LocalBackend) -> None:
    theirs, ours = _both(_multi_turn, sgl)
    s_state = theirs.run(q1="Hi", q2="And?", backend=runtime, temperature=0)
    o_state = ours.run(q1="Hi", q2="And?", backend=local, temperature=0)
    assert s_state.text() == o_state.text() and len(o_state.text()) > 40
    assert s_state["a1"] == o_state["a1"] and s_state["a2"] == o_state["a2"]
    # SGLang strips leading whitespace off message contents; ours keep the exact text rendered.
    stripped = [{**m, "content": m["content"].lstrip()} for m in o_state.messages()]
    assert s_state.messages() == stripped


def test_select_and_fork_same_text(sgl: Any, runtime: Any, local: lang.LocalBackend) -> None:
    theirs, ours = _both(_select_and_fork, sgl)
    for topic in ("tests", "caching", "rust"):
        s_state = theirs.run(topic=topic, backend=runtime, temperature=0)
        o_state = ours.run(topic=topic, backend=local, temperature=0)
        assert s_state["verdict"] == o_state["verdict"]
        assert s_state.text() == o_state.text()


def test_run_batch_and_stream_same_text(sgl: Any, runtime: Any, local: lang.LocalBackend) -> None:
    theirs, ours = _both(_multi_turn, sgl)
    batch = [{"q1": f"Question {i}", "q2": "Why?"} for i in range(5)]
    s_states = theirs.run_batch(batch, backend=runtime, temperature=0, num_threads=3)
    o_states = ours.run_batch(batch, backend=local, temperature=0)
    assert [s.text() for s in s_states] == [o.text() for o in o_states]
    streamed = theirs.run(q1="Hi", q2="And?", backend=runtime, temperature=0, stream=True)
    pieces = list(streamed.text_iter())
    want = ours.run(q1="Hi", q2="And?", backend=local, temperature=0).text()
    assert "".join(pieces) == want and len(pieces) > 3


def _regex_gen(m: Any) -> Callable[..., None]:
    def regex_gen(s: Any) -> None:
        s += "Q: which code? A:" + m.gen("code", regex="[0-9]{3}", max_tokens=8)

    return regex_gen


def test_regex_gen_same_text(sgl: Any, runtime: Any, local: lang.LocalBackend) -> None:
    theirs, ours = _both(_regex_gen, sgl)
    s_state = theirs.run(backend=runtime, temperature=0)
    o_state = ours.run(backend=local, temperature=0)
    assert s_state.text() == o_state.text()
    assert len(o_state["code"]) == 3 and o_state["code"].isdigit()


def test_select_logprobs_agree(sgl: Any, runtime: Any, local: lang.LocalBackend) -> None:
    """SGLang's greedy select compares logprobs from the start of its window, two tokens before
    the choices, so float noise on the shared prefix tokens can decide it; the logprobs our
    server gives it for the choices' own tokens are the ones pagedllm.lang scores."""
    from sglang.lang.choices import greedy_token_selection  # type: ignore[import-not-found]

    choices = [" yes", " no", " maybe"]

    @sgl.function
    def theirs(s: Any) -> None:
        s += "Q: is it on? A:"
        s += sgl.select("c", choices=choices, choices_method=greedy_token_selection)

    @lang.function
    def ours(s: Any) -> None:
        s += "Q: is it on? A:" + lang.select("c", choices=choices, choices_method="greedy")

    their_rows = theirs.run(backend=runtime).get_meta_info("c")["input_token_logprobs"]
    our_rows = ours.run(backend=local).get_meta_info("c")["token_logprobs"]
    prefix_ids = local.tokenize("Q: is it on? A:")
    for choice, their_row, our_row in zip(choices, their_rows, our_rows, strict=True):
        ids = local.tokenize("Q: is it on? A:" + choice)
        start = 0
        while start < len(prefix_ids) and prefix_ids[start] == ids[start]:
            start += 1
        tail = their_row[-len(our_row) :]
        assert [e[1] for e in tail] == ids[start:]
        assert [e[0] for e in tail] == pytest.approx(our_row, abs=1e-3)


def test_unconditional_select_and_gen_int_run(sgl: Any, runtime: Any) -> None:
    """SGLang's unconditional select sends token-id prompts for scoring, and ``gen_int`` a
    regex with stop strings: both are answered (their decisions are SGLang's own)."""
    from sglang.lang.choices import (  # type: ignore[import-not-found]
        unconditional_likelihood_normalized,
    )

    @sgl.function
    def prog(s: Any) -> None:
        s += "Pick:" + sgl.select(
            "c", choices=[" a", " bc"], choices_method=unconditional_likelihood_normalized
        )
        s += " Number: " + sgl.gen_int("n", max_tokens=4)

    state = prog.run(backend=runtime, temperature=0)
    assert state["c"] in (" a", " bc")
    assert state["n"].strip().lstrip("+-").isdigit()
