"""``EngineMonitor``: reads everything the engine process sends, and decides whether the engine
is alive.

A request must never wait forever on an engine that will not answer. Reading and watching are
one job because every message is a sign of life: a working engine sends outputs every step
while it has work and a ``Heartbeat`` every 0.5 s while idle, so silence always means it is
stopped (SIGSTOP) or stuck, busy or not. One task reads the socket (the reader); messages other
than ``EngineError`` go to ``dispatch`` (``AsyncLLM`` routes outputs to requests there).

* Death: a fatal ``EngineError``, the process is gone, the socket fails, or the reader itself
  fails. ``mark_dead`` keeps the first reason and calls ``fail_requests`` once (``AsyncLLM``
  fails every in-flight request there), and ``on_engine_death`` too unless it was ``stop()``.
* Silence: ``seconds_since_contact()`` / ``is_wedged()`` measure it, ``check_health(limit)``
  raises ``EngineUnresponsiveError`` past ``limit`` (the engine may still recover), and past
  ``engine_stall_timeout_s`` (off by default) the reader SIGKILLs the engine and declares it
  dead.

Threads: the reader runs on the event loop of the first ``start()``; until then nothing is read
and no death is noticed (a server calls ``AsyncLLM.start_monitoring`` at start-up). Use one
event loop at a time. The socket and the requests' asyncio queues belong to the reader's loop:
called from another thread while that loop runs (e.g. ``shutdown()`` from the main thread of a
server whose loop runs in a thread), the monitor leaves the socket to the reader and announces
a death through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from pagedllm.engine.engine_process import EngineProcess
from pagedllm.engine.errors import EngineDeadError, EngineUnresponsiveError
from pagedllm.engine.messages import EngineError

logger = logging.getLogger(__name__)

POLL_MS = 200  # with no message for this long, check that the engine is alive and not stalled


def check_timeout(name: str, value: float | None) -> float | None:
    """``value`` if it is None or > 0, else ValueError."""
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be > 0 or None, got {value!r}.")
    return value


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class EngineMonitor:
    """The reader of ``handle``'s messages and the judge of the engine's liveness (see the
    module docstring). ``dead`` is None while the engine runs, else why it stopped;
    ``dead_expected`` tells a ``stop()`` from a crash."""

    def __init__(
        self,
        handle: EngineProcess,
        dispatch: Callable[[Any], None],
        fail_requests: Callable[[str], None],
        *,
        engine_stall_timeout_s: float | None = None,
    ) -> None:
        self.handle = handle
        self.engine_stall_timeout_s = check_timeout(
            "engine_stall_timeout_s", engine_stall_timeout_s
        )
        self.on_engine_death: Callable[[str], None] | None = None
        self.last_contact = time.monotonic()  # the engine just sent EngineReady
        self.dead: str | None = None
        self.dead_expected = False
        self._dispatch = dispatch
        self._fail_requests = fail_requests
        self._reader: asyncio.Task[None] | None = None

    # ---- state -----------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self.dead is None and self.handle.proc.is_alive()

    @property
    def died_unexpectedly(self) -> bool:
        if self.dead is None:
            return not self.handle.closed and not self.handle.proc.is_alive()
        return not self.dead_expected

    def seconds_since_contact(self) -> float:
        self.catch_up()
        return time.monotonic() - self.last_contact

    def is_wedged(self, timeout_s: float) -> bool:
        silent = self.seconds_since_contact()
        return self.dead is None and silent > timeout_s and self.handle.proc.is_alive()

    def raise_if_dead(self) -> None:
        """EngineDeadError once the engine is dead (noticing an exit the reader has not)."""
        self._notice_exit()
        if self.dead is not None:
            raise EngineDeadError(self.dead)

    def check_health(self, limit: float | None) -> None:
        """EngineDeadError, or EngineUnresponsiveError after ``limit`` s of silence."""
        self.catch_up()
        self.raise_if_dead()
        if limit is not None and self.is_wedged(limit):
            raise EngineUnresponsiveError(
                f"No message from the engine process for {self.seconds_since_contact():.1f} s "
                f"(health_timeout_s={limit:g}): it is stopped or stuck."
            )

    # ---- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Run the reader on the running event loop (once per loop; not once dead)."""
        loop = asyncio.get_running_loop()
        if self.dead is not None or self.handle.closed:
            return
        task = self._reader
        if task is not None and not task.done() and task.get_loop() is loop:
            return
        self._reader = loop.create_task(self._read_loop(), name="pagedllm-engine-outputs")

    def stop(self) -> None:
        """The engine is being shut down (idempotent): read what it sent before (an engine that
        had already failed still counts as ``died_unexpectedly``), fail what is in flight, and
        stop the reader. The caller then closes the handle."""
        if self.dead is None and not self.handle.closed:
            self.catch_up()  # e.g. an EngineError it sent before dying
            self._notice_exit()
        self.mark_dead("The engine was shut down.", expected=True)
        task, self._reader = self._reader, None
        if task is not None and not task.done():
            with contextlib.suppress(RuntimeError):  # its loop is closed: it will never run
                task.get_loop().call_soon_threadsafe(task.cancel)

    def mark_dead(self, reason: str, *, expected: bool = False) -> None:
        """Record the engine's death (the first reason wins) and announce it once."""
        if self.dead is not None:
            return
        self.dead = reason
        self.dead_expected = expected
        if not expected:
            logger.error("Engine is dead: %s", reason)
        self._on_reader_loop(self._announce_death, reason, expected)

    def catch_up(self) -> None:
        """Read what the engine has sent, unless a reader running on another thread's loop
        owns the socket (zmq sockets are not thread-safe)."""
        if self.dead is not None or self.handle.closed:
            return
        task = self._reader
        if task is not None and not task.done():
            loop = task.get_loop()
            if loop.is_running() and _running_loop() is not loop:
                return
        self._drain()

    # ---- internals -------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while self.dead is None:
                if await self.handle.wait_readable(POLL_MS):
                    self._drain()
                elif not self.handle.proc.is_alive():
                    self._drain()  # whatever it sent before dying (e.g. an EngineError)
                    self._notice_exit()
                self._check_stall()
        except Exception as e:  # a bug here must not leave requests hanging
            if self.handle.closed:  # closed under the reader (at exit, without stop())
                self.mark_dead("The engine was shut down.", expected=True)
            elif self.dead is None:
                logger.exception("The engine output reader failed")
                self.mark_dead(f"The engine output reader failed: {e!r}")

    def _drain(self) -> None:
        for msg in self.handle.messages():
            self.last_contact = time.monotonic()
            if isinstance(msg, EngineError):
                logger.error("Engine process error:\n%s", msg.traceback)
                self.mark_dead(f"The engine process failed: {msg.message}")
                return
            self._dispatch(msg)

    def _check_stall(self) -> None:
        """Past ``engine_stall_timeout_s`` of silence, kill the engine and declare it dead."""
        limit = self.engine_stall_timeout_s
        if limit is None or self.dead is not None:
            return
        silent = self.seconds_since_contact()
        if silent > limit:
            self.handle.kill()
            self.mark_dead(
                f"No response from the engine process for {silent:.1f} s "
                f"(engine_stall_timeout_s={limit:g}); it was killed."
            )

    def _notice_exit(self) -> None:
        if self.dead is not None or self.handle.proc.is_alive():
            return
        if self.handle.closed:  # closed at exit, without shutdown()
            self.mark_dead("The engine was shut down.", expected=True)
        else:
            code = self.handle.proc.exitcode
            self.mark_dead(f"The engine process died unexpectedly (exit code {code}).")

    def _announce_death(self, reason: str, expected: bool) -> None:
        self._fail_requests(reason)
        hook = self.on_engine_death
        if hook is not None and not expected:
            try:
                hook(reason)
            except Exception:
                logger.exception("on_engine_death raised")

    def _on_reader_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Call ``fn`` on the reader's loop thread: now when already on it (or when that loop
        is not running), else scheduled there."""
        loop = self._reader.get_loop() if self._reader is not None else None
        if loop is not None and loop.is_running() and _running_loop() is not loop:
            with contextlib.suppress(RuntimeError):  # closed meanwhile: call it here
                loop.call_soon_threadsafe(fn, *args)
                return
        fn(*args)
