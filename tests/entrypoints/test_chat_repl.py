"""``pagedllm chat``: the REPL driven through a pseudo-terminal, its commands and multi-line
input, interrupting an answer, and the local and server backends giving the same greedy text."""

from __future__ import annotations

import io
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pagedllm.config import EngineConfig
from pagedllm.entrypoints.chat_backends import LocalBackend, Message, Sampling, Usage
from pagedllm.entrypoints.chat_repl import ChatSession, read_message, run_repl

_REPO_ROOT = Path(__file__).resolve().parents[2]


class _Pty:
    """``pagedllm chat`` on a pseudo-terminal (stdin is a tty: readline, as for a person)."""

    def __init__(self, *args: str) -> None:
        master, slave = os.openpty()
        env = dict(os.environ, PYTHONPATH=str(_REPO_ROOT), OMP_NUM_THREADS="1", TERM="dumb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagedllm.entrypoints.cli", "chat", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.master = master
        self.seen = ""

    def expect(self, needle: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while needle not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{needle!r} not seen; output so far:\n{self.seen}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:  # the child closed the terminal
                    data = b""
                if not data:
                    raise AssertionError(f"{needle!r} not seen before EOF:\n{self.seen}")
                self.seen += data.decode(errors="replace").replace("\r\n", "\n")
        head, _, tail = self.seen.partition(needle)
        self.seen = tail
        return head

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


def test_repl_through_a_pty(llama_dir: Path) -> None:
    flags = ["--temperature", "0", "--max-tokens", "6", "--device", "cpu", "--max-model-len", "256"]
    chat = _Pty(str(llama_dir), *flags)
    try:
        # Each line is sent once the prompt shows (readline is then reading the terminal:
        # a Ctrl-D typed before that could be eaten by the switch out of canonical mode).
        chat.expect("Chatting with ")
        chat.expect(">>> ")
        chat.send("hello there\n")
        first = chat.expect("tok/s]")
        assert "[6 tokens in " in first
        chat.expect(">>> ")
        chat.send("/system You are terse.\n")
        chat.expect("(system prompt set)")
        chat.expect(">>> ")
        chat.send('"""\n')
        chat.expect("... ")
        chat.send("line one\n")
        chat.expect("... ")
        chat.send('"""\n')
        chat.expect("tok/s]")
        chat.expect(">>> ")
        chat.send("/clear\n")
        chat.expect("(conversation cleared)")
        chat.expect(">>> ")
        chat.send("/bogus\n")
        chat.expect("(unknown command /bogus)")
        chat.expect(">>> ")
        chat.send("hello there\n")  # after /clear (system prompt kept): a fresh conversation
        chat.expect("tok/s]")
        chat.expect(">>> ")
        chat.send("\x04")  # Ctrl-D: leave
        assert chat.proc.wait(60) == 0
    finally:
        chat.close()


def test_read_message_block_and_continuation() -> None:
    lines = iter(['"""', "a", "", "b", '"""', "x \\", "y"])
    read = lambda prompt: next(lines)  # noqa: E731
    assert read_message(read) == "a\n\nb"
    assert read_message(read) == "x \ny"


class _Scripted:
    """A backend that streams fixed pieces, or is interrupted after the first."""

    name = "scripted"

    def __init__(self, interrupt: bool = False) -> None:
        self.interrupt = interrupt
        self.last_usage = Usage()
        self.seen: list[list[Message]] = []
        self.closed_streams = 0

    def stream(self, messages: list[Message], sampling: Sampling) -> Iterator[str]:
        self.seen.append([dict(m) for m in messages])
        self.last_usage = Usage(completion_tokens=2)
        try:
            yield "Hel"
            if self.interrupt:
                raise KeyboardInterrupt
            yield "lo"
        finally:
            self.closed_streams += 1

    def close(self) -> None:
        pass


def test_history_system_prompt_and_interrupt() -> None:
    backend = _Scripted()
    session = ChatSession(backend, Sampling(), system="S")
    out = io.StringIO()
    lines = iter(["hi", "/system T", "again", "/clear", "fresh", "/quit"])
    assert run_repl(session, lambda prompt: next(lines), out) == 0
    assert backend.seen[0] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
    ]
    assert backend.seen[1] == [
        {"role": "system", "content": "T"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "again"},
    ]
    assert backend.seen[2] == [
        {"role": "system", "content": "T"},
        {"role": "user", "content": "fresh"},
    ]
    assert out.getvalue().count("[2 tokens in ") == 3

    stopped = _Scripted(interrupt=True)
    session = ChatSession(stopped, Sampling(), system=None)
    out = io.StringIO()
    session.answer("hi", out)
    assert "Hel\n[2 tokens in " in out.getvalue() and ", stopped]" in out.getvalue()
    assert stopped.closed_streams == 1
    assert session.history[-1] == {"role": "assistant", "content": "Hel"}


def test_local_backend_streams_and_aborts(llama_dir: Path) -> None:
    config = EngineConfig(model=str(llama_dir), device="cpu", max_model_len=256)
    backend = LocalBackend(config)
    msgs: list[Message] = [{"role": "user", "content": "hello"}]
    sampling = Sampling(temperature=0.0, max_tokens=8)
    text = "".join(backend.stream(msgs, sampling))
    assert backend.last_usage.completion_tokens == 8
    from pagedllm import LLM, SamplingParams

    llm = LLM(**config.to_kwargs())
    ref = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert text == ref[0].outputs[0].text
    stream = backend.stream(msgs, Sampling(temperature=0.0, max_tokens=200))
    next(stream)
    stream.close()  # what Ctrl-C does: the request is aborted, nothing stays queued
    assert not backend.engine.has_unfinished_requests()


@pytest.mark.parametrize("bad", ["--base-url"])
def test_chat_parser_knows_its_flags(bad: str) -> None:
    from pagedllm.entrypoints.cli import build_parser

    args = build_parser().parse_args(["chat", "m", bad, "http://x:1", "--temperature", "0.5"])
    assert (args.model, args.base_url, args.temperature) == ("m", "http://x:1", 0.5)
