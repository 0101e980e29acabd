"""The ``pagedllm.lang`` interpreter on the tiny llama, in-process (``LocalBackend``).

Expected values come from independent computations: the tokenizer's own chat-template
rendering, ``LLM.generate`` on the same text, and transformers' logprobs for ``select``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from pagedllm import lang
from pagedllm.lang.backend.drivers import Submission
from pagedllm.lang.state import ProgramState
from pagedllm.sampling_params import SamplingParams
from tests.fixtures.tiny_models import hf_logprobs

QUESTIONS = ["What is 2 + 2?", "Name a color.", "def f(x):", "import os", "Hello there"]


@lang.function
def chat(s: ProgramState, question: str, max_tokens: int = 6) -> None:
    s += lang.system("You answer briefly.")
    s += lang.user(question)
    s += lang.assistant(lang.gen("answer", max_tokens=max_tokens))


def _greedy_text(local: lang.LocalBackend, text: str, max_tokens: int) -> str:
    """What the engine generates after ``text`` (greedy), submitted directly, outside the
    interpreter (through the backend's driver, which owns the engine's thread)."""
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    future = local._driver.submit_many([Submission(local.processor.tokenize(text), sp)])[0]
    return future.result().outputs[0].text


def test_roles_follow_the_chat_template(local: lang.LocalBackend) -> None:
    state = chat.run(question=QUESTIONS[0], backend=local, temperature=0)
    answer = state["answer"]
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": QUESTIONS[0]},
        {"role": "assistant", "content": answer},
    ]
    assert state.messages() == messages
    tok = local.tokenizer
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert tok.bos_token + state.text() == rendered
    head = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert answer == _greedy_text(local, head.removeprefix(tok.bos_token), 6)


def test_role_blocks_as_with_statements(local: lang.LocalBackend) -> None:
    @lang.function
    def blocks(s: ProgramState) -> None:
        with s.user():
            s += "Say "
            s += "hi"
        with s.assistant():
            s += lang.gen("reply", max_tokens=3)

    plain = chat.run(question="Say hi", backend=local, temperature=0, max_tokens=3)
    state = blocks.run(backend=local, temperature=0)
    assert state.messages()[0] == {"role": "user", "content": "Say hi"}
    assert state["reply"] == _greedy_text(local, "<|user|>\nSay hi<|end|>\n<|assistant|>\n", 3)
    assert plain.messages()[1]["content"] == "Say hi"


def test_gen_with_stop(local: lang.LocalBackend) -> None:
    @lang.function
    def prog(s: ProgramState, stop: list[str] | None) -> None:
        s += "def main():\n"
        s += lang.gen("body", max_tokens=16, stop=stop, ignore_eos=True)

    full = prog.run(stop=None, backend=local, temperature=0)["body"]
    assert full == _greedy_text(local, "def main():\n", 16) and len(full) > 5
    stop = full[3:5]
    state = prog.run(stop=[stop], backend=local, temperature=0)
    assert state["body"] == full[: full.index(stop)]
    assert state.get_meta_info("body")["finish_reason"] == {"type": "stop", "matched": stop}
    assert state.text() == "def main():\n" + state["body"]


def _hf_choice_logprobs(model_dir: Path, ids: list[int], start: int) -> list[float]:
    ref = hf_logprobs(model_dir, ids)
    return [ref[p - 1, ids[p]].item() for p in range(start, len(ids))]


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.parametrize(
    "method", ["token_length_normalized", "greedy", "unconditional_normalized"]
)
def test_select_matches_a_direct_computation(
    local: lang.LocalBackend, llama_dir: Path, method: str
) -> None:
    prefix = "The answer is"
    choices = [" yes", " no", " maybe not", " 42"]

    @lang.function
    def prog(s: ProgramState) -> None:
        s += prefix + lang.select("pick", choices=choices, choices_method=method)

    state = prog.run(backend=local)
    p_ids = local.processor.tokenize(prefix)
    rows = []
    uncond = []
    bos = local.processor.tokenize("")
    for c in choices:
        ids = local.processor.tokenize(prefix + c)
        start = _common(p_ids, ids)
        rows.append(_hf_choice_logprobs(llama_dir, ids, start))
        alone = bos + ids[start:]
        uncond.append(_hf_choice_logprobs(llama_dir, alone, len(bos)))
    means = [sum(r) / len(r) for r in rows]
    if method == "token_length_normalized":
        want = max(range(len(choices)), key=lambda i: means[i])
    elif method == "greedy":
        want = max(range(len(choices)), key=lambda i: rows[i][0])
    else:
        scores = [
            sum(a - b for a, b in zip(r, u, strict=True)) / len(r)
            for r, u in zip(rows, uncond, strict=True)
        ]
        want = max(range(len(choices)), key=lambda i: scores[i])
    assert state["pick"] == choices[want]
    assert state.text() == prefix + choices[want]
    meta = state.get_meta_info("pick")
    for got, ref in zip(meta["token_logprobs"], rows, strict=True):
        assert got == pytest.approx(ref, abs=1e-3)


def test_fork_and_join(local: lang.LocalBackend) -> None:
    intro = "Here are three ideas about caching. " * 3

    @lang.function
    def tree(s: ProgramState) -> None:
        s += intro
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f"Idea {i}:" + lang.gen("idea", max_tokens=4)
        forks.join()

    state = tree.run(backend=local, temperature=0)
    ideas = state["idea"]
    # Branch threads end once their work is done (none is left waiting forever).
    deadline = time.monotonic() + 5
    while any(t.name == "lang-branch" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "branch threads outlived their work"
        time.sleep(0.01)
    assert ideas == [_greedy_text(local, f"{intro}Idea {i}:", 4) for i in range(3)]
    assert state.text() == intro  # the parent is unchanged; branches carry their own text


def test_fork_branches_reuse_the_prefix_kv(local: lang.LocalBackend) -> None:
    intro = "A long shared context that fills several KV blocks. " * 4
    branches: list[ProgramState] = []

    @lang.function
    def prog(s: ProgramState) -> None:
        s += intro
        forks = s.fork(2)
        forks += lang.gen("x", max_tokens=2)
        branches.extend(forks.join())

    prog.run(backend=local, temperature=0)
    prompt_tokens = len(local.processor.tokenize(intro))
    block = local._driver.engine.config.cache_config.block_size
    for b in branches:
        meta = b.get_meta_info("x")
        assert meta["prompt_tokens"] == prompt_tokens
        # Every full block of the shared text was found cached.
        assert meta["cached_tokens"] == (prompt_tokens - 1) // block * block > 0
        assert b.text() == intro + b["x"]


def test_select_after_a_long_context_reads_it_from_the_prefix_cache(
    local: lang.LocalBackend,
) -> None:
    """A select after a long context asks for logprobs only near the choices, so the context's
    full blocks come from the prefix cache; the scores equal those of a full scoring."""
    context = "A long shared context that fills several KV blocks, then a question? " * 3
    choices = [" yes", " no", " maybe"]
    local.cache_prefix(context)
    kv = local._driver.engine.scheduler.kv
    hits = kv.prefix_hits

    @lang.function
    def prog(s: ProgramState) -> None:
        s += context + lang.select("pick", choices=choices)

    state = prog.run(backend=local)
    block = local._driver.engine.config.cache_config.block_size
    assert kv.prefix_hits - hits >= len(choices) * 2 * block  # each choice's prompt hit
    p_ids = local.processor.tokenize(context)
    full = local.score([context + c for c in choices])  # every position computed
    for got, f in zip(state.get_meta_info("pick")["token_logprobs"], full, strict=True):
        start = _common(p_ids, f.token_ids)
        assert got == pytest.approx([float(x) for x in f.logprobs[start:]], abs=1e-4)


def test_run_batch_keeps_order(local: lang.LocalBackend) -> None:
    batch = [{"question": q, "max_tokens": 3 + i % 3} for i, q in enumerate(QUESTIONS * 2)]
    states = chat.run_batch(batch, backend=local, temperature=0, num_threads=4)
    singles = [chat.run(**kw, backend=local, temperature=0)["answer"] for kw in batch]
    assert [s["answer"] for s in states] == singles
    assert [s.messages()[1]["content"] for s in states] == [kw["question"] for kw in batch]


def test_streaming_text_equals_final_text(local: lang.LocalBackend) -> None:
    state = chat.run(question=QUESTIONS[2], backend=local, temperature=0, stream=True,
                     max_tokens=10)  # fmt: skip
    pieces = list(state.text_iter())
    assert len(pieces) > 3 and "".join(pieces) == state.text()
    answer = "".join(chat.run(question=QUESTIONS[2], backend=local, temperature=0, stream=True,
                              max_tokens=10).text_iter("answer"))  # fmt: skip
    assert (
        answer
        == state["answer"]
        == chat.run(question=QUESTIONS[2], backend=local, temperature=0, max_tokens=10)["answer"]
    )

    async def consume() -> str:
        s = chat.run(question=QUESTIONS[2], backend=local, temperature=0, stream=True,
                     max_tokens=10)  # fmt: skip
        return "".join([p async for p in s.text_async_iter()])

    assert asyncio.run(consume()) == state.text()


def test_select_is_one_batched_submission(
    local: lang.LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    submit = local._driver.submit_many

    def recording(subs: list[Submission]) -> list[object]:
        calls.append(len(subs))
        return submit(subs)  # type: ignore[return-value]

    monkeypatch.setattr(local._driver, "submit_many", recording)

    @lang.function
    def prog(s: ProgramState) -> None:
        s += "Pick:" + lang.select("c", choices=[" a", " b", " c", " d"])

    prog.run(backend=local)
    assert calls == [4]  # the four continuations of the text, together


def test_gen_with_regex_and_json_schema(local: lang.LocalBackend, endpoint: lang.Endpoint) -> None:
    import json

    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }

    @lang.function
    def prog(s: ProgramState) -> None:
        s += "Answer:" + lang.gen("yn", regex="(yes|no)", max_tokens=8)
        s += "\nJSON:" + lang.gen("js", json_schema=schema, max_tokens=24)

    for backend in (local, endpoint):
        state = prog.run(backend=backend, temperature=0)
        assert state["yn"] in ("yes", "no")
        assert isinstance(json.loads(state["js"])["n"], int)
    assert (
        prog.run(backend=local, temperature=0).text()
        == prog.run(backend=endpoint, temperature=0).text()
    )


def test_reading_a_streamed_program_waits_for_its_end(local: lang.LocalBackend) -> None:
    @lang.function
    def uses_its_own_answer(s: ProgramState) -> None:
        s += lang.user("Hi")
        s += lang.assistant(lang.gen("a", max_tokens=4))
        s += lang.user("You said: " + s["a"])  # the program reads its state at once

    state = uses_its_own_answer.run(backend=local, temperature=0, stream=True)
    final = uses_its_own_answer.run(backend=local, temperature=0)
    assert state["a"] == final["a"] and state.text() == final.text()
    assert state.messages()[-1]["content"] == "You said: " + final["a"]


def test_text_iter_of_a_finished_program(local: lang.LocalBackend) -> None:
    state = chat.run(question=QUESTIONS[1], backend=local, temperature=0)
    assert list(state.text_iter()) == [state.text()]
    assert list(state.text_iter("answer")) == ([state["answer"]] if state["answer"] else [])
