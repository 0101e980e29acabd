"""The interpreter: a program's state (text, messages, variables) and how each expression
changes it.

``s += expr`` runs ``expr`` at once on the program's own thread (a program runs on one thread:
the caller's for ``run``, a pool thread for ``run_batch``, a background thread when
streaming). A fork's branches run on their own threads: ``forks[i] += gen(...)`` queues the
work and returns, so the branches of a fork generate concurrently and the engine batches them;
reading a branch (``forks[i]["x"]``, ``text()``) or ``join()`` waits for it.

A failing call becomes a ``ProgramError`` that names the expression and the line of the
program that appended it. It is raised where the program appended it (on the program's
thread) or, for a branch, when the branch is read or joined.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from pagedllm.lang.backend.base import Backend
from pagedllm.lang.choices import decide
from pagedllm.lang.ir import Concat, Expr, Gen, GenParams, RoleBegin, RoleEnd, Select, Text, as_expr

_LANG_DIR = os.path.dirname(os.path.abspath(__file__))


class ProgramError(RuntimeError):
    """A call of a program failed; the message names the call and where the program made it."""


def _caller() -> str:
    """``file:line in function`` of the first frame outside this package (the program)."""
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_LANG_DIR):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return "<unknown>"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


def _describe(expr: Expr) -> str:
    if isinstance(expr, Gen):
        return f"gen({expr.name!r})"
    if isinstance(expr, Select):
        return f"select({expr.name!r}, choices={expr.choices!r})"
    if isinstance(expr, (RoleBegin, RoleEnd)):
        return f"{expr.role} role block"
    return type(expr).__name__.lower()


class ProgramState:
    """What a program has built so far. ``s[name]`` is a variable set by ``gen``/``select``."""

    def __init__(
        self, backend: Backend, defaults: GenParams, stream: bool = False, threaded: bool = False
    ) -> None:
        self.backend = backend
        self.defaults = defaults
        self.stream = stream
        self._text = ""
        self._messages: list[dict[str, str]] = []
        self._role: tuple[str, int] | None = None  # the open role block and where it began
        self._vars: dict[str, Any] = {}
        self._meta: dict[str, Any] = {}
        self._error: ProgramError | None = None
        self._events: list[tuple[str | None, str]] = []  # (variable or None, text) as added
        self._changed = threading.Condition()
        self._finished = not stream
        self._program_thread: int | None = None  # the thread running a streamed program
        self._threaded = threaded
        self._pending: deque[tuple[Expr, str]] = deque()
        self._busy = False  # a worker thread is running this branch's pending work
        self._work = threading.Condition()

    # ---- appending -----------------------------------------------------------------------
    def __iadd__(self, other: Expr | str) -> ProgramState:
        self.append(other, _caller())
        return self

    def append(self, other: Expr | str, where: str | None = None) -> None:
        expr, where = as_expr(other), where or _caller()
        if self._threaded:
            with self._work:
                self._pending.append((expr, where))
                if not self._busy:
                    self._busy = True
                    threading.Thread(target=self._worker, daemon=True, name="lang-branch").start()
            return
        if self._error is not None:
            raise self._error
        self._run(expr, where)
        if self._error is not None:
            raise self._error

    def _worker(self) -> None:
        """Run the branch's pending work, then end (a new one starts for later work)."""
        while True:
            with self._work:
                if not self._pending:
                    self._busy = False
                    self._work.notify_all()
                    return
                expr, where = self._pending.popleft()
            if self._error is None:
                self._run(expr, where)

    def _wait_idle(self) -> None:
        with self._work:
            while self._busy:
                self._work.wait()

    def _run(self, expr: Expr, where: str) -> None:
        try:
            self._execute(expr)
        except ProgramError as e:
            self._error = e
        except Exception as e:
            self._error = ProgramError(f"{_describe(expr)} at {where} failed: {e}")
            self._error.__cause__ = e

    def _add_text(self, text: str, var: str | None = None) -> None:
        with self._changed:
            self._text += text
            if self.stream:  # what text_iter replays
                self._events.append((var, text))
            self._changed.notify_all()

    def _execute(self, expr: Expr) -> None:
        if isinstance(expr, Text):
            self._add_text(expr.text)
        elif isinstance(expr, Concat):
            for part in expr.parts:
                self._execute(part)
        elif isinstance(expr, RoleBegin):
            if self._role is not None:
                raise ValueError(f"a {expr.role} block cannot open inside a {self._role[0]} block.")
            self._add_text(self.backend.role_template.begin(expr.role, not self._messages))
            self._role = (expr.role, len(self._text))
        elif isinstance(expr, RoleEnd):
            if self._role is None or self._role[0] != expr.role:
                open_role = self._role[0] if self._role else "no"
                raise ValueError(f"{expr.role} block closed while {open_role} block is open.")
            content = self._text[self._role[1] :]
            self._messages.append({"role": expr.role, "content": content})
            self._role = None
            self._add_text(self.backend.role_template.end(expr.role))
        elif isinstance(expr, Gen):
            self._gen(expr)
        elif isinstance(expr, Select):
            d = decide(self.backend, self._text, expr.choices, expr.method)
            choice = expr.choices[d.index]
            self._add_text(choice, expr.name)
            if expr.name is not None:
                self._vars[expr.name] = choice
                self._meta[expr.name] = {"scores": d.scores, "token_logprobs": d.token_logprobs}
        else:
            raise TypeError(f"unknown expression {expr!r}")

    def _gen(self, expr: Gen) -> None:
        params = expr.params.merged(self.defaults)
        on_delta = (lambda piece: self._add_text(piece, expr.name)) if self.stream else None
        if self.backend.chat_only:
            if self._role is None or self._role[0] != "assistant":
                raise ValueError("this backend generates only inside an assistant block.")
            if self._text[self._role[1] :]:
                raise ValueError("this backend cannot continue a partly written assistant turn.")
            out = self.backend.generate_chat(list(self._messages), params, on_delta)
        else:
            out = self.backend.generate(self._text, params, on_delta)
        if not self.stream:
            self._add_text(out.text, expr.name)
        if expr.name is not None:
            self._vars[expr.name] = out.text
            self._meta[expr.name] = out.meta_info

    # ---- reading -------------------------------------------------------------------------
    def _wait_program(self) -> None:
        """A streamed program is read by others once it has ended (``text_iter`` shows it as it
        runs); the program itself reads its state at once."""
        if self.stream and threading.get_ident() != self._program_thread:
            with self._changed:
                while not self._finished:
                    self._changed.wait()

    def sync(self) -> None:
        """Wait until everything appended so far has run; raise the program's error."""
        self._wait_program()
        self._wait_idle()
        if self._error is not None:
            raise self._error

    @property
    def error(self) -> ProgramError | None:
        self._wait_program()
        self._wait_idle()
        return self._error

    def __getitem__(self, name: str) -> Any:
        self.sync()
        if name not in self._vars:
            raise KeyError(f"The program set no variable {name!r} (set: {sorted(self._vars)}).")
        return self._vars[name]

    def __contains__(self, name: str) -> bool:
        self.sync()
        return name in self._vars

    def __setitem__(self, name: str, value: Any) -> None:
        self._vars[name] = value

    def get_var(self, name: str) -> Any:
        return self[name]

    def get_meta_info(self, name: str) -> Any:
        self.sync()
        return self._meta.get(name)

    def variables(self) -> dict[str, Any]:
        self.sync()
        return dict(self._vars)

    def text(self) -> str:
        self.sync()
        return self._text

    def messages(self) -> list[dict[str, str]]:
        """The role blocks so far, as chat messages."""
        self.sync()
        return [dict(m) for m in self._messages]

    # ---- roles as blocks -----------------------------------------------------------------
    @contextmanager
    def _block(self, role: Any) -> Iterator[None]:
        where = _caller()
        self.append(RoleBegin(role), where)
        yield
        self.append(RoleEnd(role), where)

    def system(self) -> Any:
        return self._block("system")

    def user(self) -> Any:
        return self._block("user")

    def assistant(self) -> Any:
        return self._block("assistant")

    # ---- forks ---------------------------------------------------------------------------
    def fork(self, n: int) -> ForkGroup:
        """``n`` branches that continue from this state on their own threads. The prefix
        cache is primed with the text so far first, so every branch finds its KV."""
        if n < 1:
            raise ValueError(f"fork needs n >= 1, got {n}.")
        self.sync()
        if self._text and not self.backend.chat_only:
            self.backend.cache_prefix(self._text)
        branches = []
        for _ in range(n):
            b = ProgramState(self.backend, self.defaults, stream=False, threaded=True)
            b._text, b._messages, b._role = (
                self._text,
                [dict(m) for m in self._messages],
                self._role,
            )
            b._vars, b._meta = dict(self._vars), dict(self._meta)
            branches.append(b)
        return ForkGroup(self, branches)

    # ---- streaming -----------------------------------------------------------------------
    def _finish_stream(self, error: BaseException | None) -> None:
        with self._changed:
            if error is not None and self._error is None:
                self._error = error if isinstance(error, ProgramError) else ProgramError(str(error))
            self._finished = True
            self._changed.notify_all()

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """The program's text as it is added (only ``var_name``'s generation if given), until
        the program ends; then its error, if any, is raised. A program that was not run with
        ``stream=True`` yields its whole text (or variable) at once."""
        if not self.stream:
            self.sync()
            value = self._text if var_name is None else self._vars.get(var_name)
            if value:
                yield value
            return
        seen = 0
        while True:
            with self._changed:
                while seen == len(self._events) and not self._finished:
                    self._changed.wait()
                events, done = self._events[seen:], self._finished
                seen += len(events)
            for var, piece in events:
                if var_name is None or var == var_name:
                    yield piece
            if done and seen == len(self._events):
                break
        if self._error is not None:
            raise self._error

    async def text_async_iter(self, var_name: str | None = None) -> AsyncIterator[str]:
        """``text_iter`` for asyncio code (each wait runs in a worker thread)."""
        it = self.text_iter(var_name)
        done = object()
        while True:
            piece = await asyncio.to_thread(next, it, done)
            if piece is done:
                return
            yield piece  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"ProgramState(text={self._text[-60:]!r}, vars={sorted(self._vars)})"


class ForkGroup:
    """The branches of ``fork``: index them, ``+=`` to all of them, ``join()`` them."""

    def __init__(self, parent: ProgramState, branches: list[ProgramState]) -> None:
        self.parent = parent
        self.branches = branches

    def __getitem__(self, i: int) -> ProgramState:
        return self.branches[i]

    def __setitem__(self, i: int, value: ProgramState) -> None:
        """Lets ``forks[i] += expr`` work (Python stores the result back)."""
        if value is not self.branches[i]:
            raise TypeError("A fork's branches cannot be replaced.")

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.branches)

    def __len__(self) -> int:
        return len(self.branches)

    def __iadd__(self, other: Expr | str | list[Expr | str]) -> ForkGroup:
        where = _caller()
        items = other if isinstance(other, list) else [other] * len(self.branches)
        if len(items) != len(self.branches):
            raise ValueError(f"{len(items)} expressions for {len(self.branches)} branches.")
        for b, item in zip(self.branches, items, strict=True):
            b.append(item, where)
        return self

    def join(self) -> list[ProgramState]:
        """Wait for every branch; the parent gets each variable a branch set as a list (one
        value per branch). A failed branch raises its error, naming the branch."""
        for i, b in enumerate(self.branches):
            try:
                b.sync()
            except ProgramError as e:
                raise ProgramError(f"fork branch {i}: {e}") from e
        before = self.parent._vars
        names = {k for b in self.branches for k, v in b._vars.items() if before.get(k) is not v}
        for name in sorted(names):
            self.parent._vars[name] = [b._vars.get(name) for b in self.branches]
        return self.branches
