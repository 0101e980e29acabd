"""``pagedllm chat [MODEL]``: talk to a model in the terminal, streamed, with its chat template.

The quickest way to see whether a model (or a server) behaves: type a message, watch the
answer stream in, read the tokens/s footer. The conversation is kept, so follow-up questions
work; commands start with ``/``:

* ``/system TEXT`` sets the system prompt (``/system`` alone removes it);
* ``/clear`` forgets the conversation (the system prompt stays);
* ``/quit`` or ``/exit`` (or Ctrl-D) leaves;
* a line of ``\"\"\"`` opens a multi-line message, closed by another such line; a line ending
  with a backslash continues on the next line.

Ctrl-C while an answer streams stops that answer (the request is aborted; the partial answer
is kept in the conversation) and returns to the prompt. ``--base-url`` talks to an
OpenAI-compatible server instead of loading the model here (``chat_backends.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TextIO

from pagedllm.entrypoints.chat_backends import ChatBackend, Message, Sampling

HELP = (
    'Commands: /system TEXT, /clear, /quit. Multi-line: a line of """ opens and closes a '
    "block; a trailing \\ continues the line. Ctrl-C stops an answer."
)
_BLOCK = '"""'


def read_message(read_line: Callable[[str], str]) -> str:
    """One user message from ``read_line`` (``input``-like; EOFError passes through)."""
    first = read_line(">>> ")
    if first.strip() == _BLOCK:
        lines: list[str] = []
        while (line := read_line("... ")).strip() != _BLOCK:
            lines.append(line)
        return "\n".join(lines)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read_line("... "))
    return "\n".join(lines)


class ChatSession:
    """The conversation and the commands; ``answer`` streams one reply to ``out``."""

    def __init__(self, backend: ChatBackend, sampling: Sampling, system: str | None) -> None:
        self.backend = backend
        self.sampling = sampling
        self.system = system
        self.history: list[Message] = []

    def messages(self) -> list[Message]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def command(self, text: str, out: TextIO) -> bool:
        """Run a ``/command``; False when the session should end."""
        name, _, rest = text.strip().partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/clear":
            self.history.clear()
            out.write("(conversation cleared)\n")
        elif name == "/system":
            self.system = rest.strip() or None
            out.write("(system prompt set)\n" if self.system else "(system prompt removed)\n")
        else:
            out.write(f"(unknown command {name}) {HELP}\n")
        return True

    def answer(self, text: str, out: TextIO) -> None:
        self.history.append({"role": "user", "content": text})
        pieces: list[str] = []
        start = time.perf_counter()
        stream = self.backend.stream(self.messages(), self.sampling)
        stopped = False
        try:
            for piece in stream:
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            stopped = True
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # aborts the request when interrupted
        elapsed = max(time.perf_counter() - start, 1e-9)
        self.history.append({"role": "assistant", "content": "".join(pieces)})
        n = self.backend.last_usage.completion_tokens
        note = ", stopped" if stopped else ""
        out.write(f"\n[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tok/s{note}]\n")


def run_repl(
    session: ChatSession, read_line: Callable[[str], str] = input, out: TextIO = sys.stdout
) -> int:
    out.write(f"Chatting with {session.backend.name}. {HELP}\n")
    while True:
        try:
            text = read_message(read_line)
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh prompt
            out.write("\n")
            continue
        if not text.strip():
            continue
        if text.lstrip().startswith("/"):
            if not session.command(text, out):
                return 0
            continue
        try:
            session.answer(text, out)
        except ValueError as e:  # a prompt too long, a server error: say so, keep going
            session.history.pop()
            out.write(f"\nerror: {e}\n")


def add_chat_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from pagedllm.config.cli_args import add_engine_args
    from pagedllm.entrypoints.cli_compat import add_config_file_arg

    p = sub.add_parser(
        "chat",
        help="chat with a model in the terminal (streamed)",
        description="Chat with MODEL (a directory or hub id; default: the demo model), or "
        "with an OpenAI-compatible server (--base-url; MODEL is then the served model name, "
        "default: the server's first). " + HELP,
    )
    p.add_argument("model", nargs="?", default=None, metavar="MODEL")
    c = p.add_argument_group("chat")
    c.add_argument("--base-url", default=None, help="an OpenAI-compatible server to talk to")
    c.add_argument("--api-key", default=None, help="API key for --base-url")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--temperature", type=float, default=None, help="(default: the model's)")
    c.add_argument("--top-p", type=float, default=None, help="(default: the model's)")
    c.add_argument("--max-tokens", type=int, default=512, help="per answer (default: 512)")
    c.add_argument("--sampling-seed", type=int, default=None, help="per-answer sampling seed")
    c.add_argument("--chat-template", default=None, help="Jinja chat template (file or text)")
    add_config_file_arg(p)
    add_engine_args(p)
    p.set_defaults(func=chat_main)


def make_backend(args: argparse.Namespace) -> ChatBackend:
    """The backend the flags ask for: a server (``--base-url``) or a local engine."""
    from pathlib import Path

    from pagedllm.entrypoints.chat_backends import LocalBackend, RemoteBackend

    if args.base_url:
        return RemoteBackend(args.base_url, args.model or args.model_flag, args.api_key)
    from pagedllm.config import EngineConfig
    from pagedllm.config.cli_args import engine_kwargs_from_args
    from pagedllm.entrypoints.model_source import check_architecture

    kwargs = engine_kwargs_from_args(args)
    kwargs["model"] = args.model or args.model_flag
    config = EngineConfig(**kwargs)
    check_architecture(config)
    template = args.chat_template
    if template is not None and Path(template).expanduser().is_file():
        template = Path(template).expanduser().read_text()
    return LocalBackend(config, template)


def chat_main(args: argparse.Namespace) -> int:
    sampling = Sampling(
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.sampling_seed,
    )
    backend = make_backend(args)
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input())
    try:
        return run_repl(ChatSession(backend, sampling, args.system))
    finally:
        backend.close()
