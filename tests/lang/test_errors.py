"""Errors of ``pagedllm.lang`` programs name the failing call and the program's line."""

from __future__ import annotations

import inspect

import pytest

from pagedllm import lang
from pagedllm.lang.state import ProgramState


def _line_of(marker: str) -> int:
    source, start = inspect.getsourcelines(inspect.getmodule(_line_of))  # type: ignore[arg-type]
    for i, line in enumerate(source):
        if marker in line and "_line_of" not in line:
            return start + i if start else i + 1
    raise AssertionError(marker)


@lang.function
def bad_gen(s: ProgramState) -> None:
    s += "Hello"
    s += lang.gen("x", max_tokens=4, temperature=-1.0)  # BAD-GEN


def test_failing_gen_names_the_call_and_line(local: lang.LocalBackend) -> None:
    with pytest.raises(lang.ProgramError) as info:
        bad_gen.run(backend=local)
    message = str(info.value)
    assert "gen('x')" in message and "temperature" in message
    assert f"test_errors.py:{_line_of('# BAD-GEN')} in bad_gen" in message


def test_role_misuse(local: lang.LocalBackend) -> None:
    @lang.function
    def nested(s: ProgramState) -> None:
        with s.user():
            s += lang.assistant("no")

    with pytest.raises(lang.ProgramError, match="cannot open inside a user block"):
        nested.run(backend=local)

    @lang.function
    def unclosed(s: ProgramState) -> None:
        s += lang.user_begin()
        s += "hi"

    with pytest.raises(lang.ProgramError, match="open user block"):
        unclosed.run(backend=local)


def test_bad_select_and_arguments(local: lang.LocalBackend) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        lang.select("x", choices=[])
    with pytest.raises(ValueError, match="choices_method"):
        lang.select("x", choices=["a"], choices_method="best")  # type: ignore[arg-type]

    @lang.function
    def prog(s: ProgramState, q: str) -> None:
        s += q

    with pytest.raises(TypeError, match="no argument 'question'"):
        prog.run(question="a", backend=local)
    with pytest.raises(TypeError, match="unknown option"):
        prog.run_batch([{"q": "a"}], backend=local, temprature=0)


@lang.function
def forked(s: ProgramState) -> None:
    s += "Start."
    forks = s.fork(2)
    forks[0] += lang.gen("ok", max_tokens=2)
    forks[1] += lang.gen("bad", max_tokens=2, top_p=0.0)  # BAD-BRANCH
    forks.join()


def test_failing_branch_is_named_at_join(local: lang.LocalBackend) -> None:
    with pytest.raises(lang.ProgramError) as info:
        forked.run(backend=local)
    message = str(info.value)
    assert message.startswith("fork branch 1: gen('bad') at ") and "top_p" in message
    assert f"test_errors.py:{_line_of('# BAD-BRANCH')} in forked" in message


def test_run_batch_isolates_a_failing_program(local: lang.LocalBackend) -> None:
    @lang.function
    def prog(s: ProgramState, t: float) -> None:
        s += "Hi"
        s += lang.gen("x", max_tokens=2, temperature=t)

    states = prog.run_batch([{"t": 0.0}, {"t": -1.0}, {"t": 0.0}], backend=local)
    assert states[0]["x"] == states[2]["x"]
    assert states[1].error is not None and "gen('x')" in str(states[1].error)
    with pytest.raises(lang.ProgramError):
        states[1].text()


def test_streamed_program_error_reaches_the_reader(local: lang.LocalBackend) -> None:
    state = bad_gen.run(backend=local, stream=True)
    pieces = []
    with pytest.raises(lang.ProgramError, match="gen\\('x'\\)"):
        for p in state.text_iter():
            pieces.append(p)
    assert "".join(pieces) == "Hello"


def test_no_backend() -> None:
    with pytest.raises(ValueError, match="No backend"):
        bad_gen.run()
