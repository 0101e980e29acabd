"""``AsyncLLM``: an asyncio client for an engine running in its own process.

The API process (e.g. the HTTP server) tokenizes and validates requests itself, then sends
them to the engine process (``core_proc``) over a zmq PUSH socket. One background task (the
reader) reads the engine's per-step ``EngineOutputs`` and routes each ``RequestOutput`` to the
asyncio.Queue of its request; ``generate()`` yields from that queue.

The reader also watches the engine, because a request must never wait forever on it:

* Death: a fatal ``EngineError``, or the process is gone. Every in-flight request then fails
  with ``EngineDeadError``; ``died_unexpectedly`` tells a crash from ``shutdown()``, and
  ``on_engine_death`` (if set) is called once with the reason.
* Silence: the engine sends outputs every step while it has work and a ``Heartbeat`` every
  0.5 s while idle, so an engine that sends nothing at all is stopped (SIGSTOP) or stuck, busy
  or not. ``seconds_since_contact()`` / ``is_wedged()`` measure it, ``check_health()`` raises
  ``EngineUnresponsiveError`` past ``health_timeout_s`` (the engine may still recover), and past
  ``engine_stall_timeout_s`` (off by default) the engine is SIGKILLed and declared dead, which
  fails every in-flight request.
* ``generate(request_timeout_s=...)`` bounds one request: past it, the request is aborted in
  the engine and ``RequestTimeoutError`` is raised. One timer handle per request (not a task):
  it puts the error into the request's queue.

The reader runs on the loop of the first async call (``generate``, ``get_stats``,
``check_health``, ``start_monitoring``); until then nothing is read (and no death noticed).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio
from transformers import PreTrainedTokenizerBase

from pagedllm.config import EngineConfig
from pagedllm.engine.core_proc import EngineProcess
from pagedllm.engine.input_processing import tokenize_prompt, validate_request
from pagedllm.engine.messages import (
    AbortRequests,
    AddRequest,
    EngineError,
    EngineOutputs,
    Heartbeat,
    RequestError,
)
from pagedllm.engine.tokenizer import (
    GenerationDefaults,
    load_generation_defaults,
    load_tokenizer,
)
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_POLL_MS = 200  # with no output for this long, check that the engine is alive and not stalled
DEFAULT_HEALTH_TIMEOUT_S = 10.0  # 20 missed heartbeats; far above any normal step


class EngineDeadError(RuntimeError):
    """The engine process died or was shut down; nothing more will be generated."""


class EngineUnresponsiveError(RuntimeError):
    """The engine process is alive but has sent nothing, not even a heartbeat, for longer than
    ``health_timeout_s``: it is stopped or stuck. It may still recover."""


class RequestTimeoutError(RuntimeError):
    """A request ran past its ``request_timeout_s``; it was aborted in the engine."""


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_waiting_requests`` allows."""


@dataclass
class _Stream:
    prompt: str | None
    prompt_token_ids: list[int]
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)


@dataclass
class _Timeout:
    """A request's deadline: one timer handle puts ``error`` into the request's queue when it
    passes (waking a waiting generator); ``expired()`` catches a consumer that is late."""

    loop: asyncio.AbstractEventLoop
    deadline: float
    error: RequestTimeoutError
    timer: asyncio.TimerHandle

    @classmethod
    def arm(cls, stream: _Stream, request_id: str, timeout_s: float | None) -> _Timeout | None:
        if timeout_s is None:
            return None
        loop = asyncio.get_running_loop()
        error = RequestTimeoutError(
            f"Request {request_id!r} did not finish within {timeout_s:g} s "
            "(request_timeout_s); it was aborted."
        )
        deadline = loop.time() + timeout_s
        return cls(loop, deadline, error, loop.call_at(deadline, stream.queue.put_nowait, error))

    def expired(self) -> bool:
        return self.loop.time() >= self.deadline


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _check_timeout(name: str, value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be > 0 or None, got {value!r}.")
    return value


class AsyncLLM:
    """Async front end of an engine process. Build it with ``AsyncLLM.from_config``.

    Settable attributes: ``max_waiting_requests``, ``health_timeout_s``,
    ``engine_stall_timeout_s`` and ``on_engine_death`` (a ``Callable[[str], None]`` called once,
    with the reason, when the engine dies before ``shutdown()``; on the event loop thread;
    its exceptions are logged).
    """

    def __init__(
        self,
        config: EngineConfig,
        handle: EngineProcess,
        tokenizer: PreTrainedTokenizerBase,
        generation_defaults: GenerationDefaults,
        stats: dict[str, float],
        max_waiting_requests: int | None = None,
        *,
        health_timeout_s: float | None = DEFAULT_HEALTH_TIMEOUT_S,
        engine_stall_timeout_s: float | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.generation_defaults = generation_defaults
        self.max_waiting_requests = max_waiting_requests
        self.health_timeout_s = _check_timeout("health_timeout_s", health_timeout_s)
        self.engine_stall_timeout_s = _check_timeout(
            "engine_stall_timeout_s", engine_stall_timeout_s
        )
        self.on_engine_death: Callable[[str], None] | None = None
        self._handle = handle
        self._stats = stats
        self._streams: dict[str, _Stream] = {}
        self._num_sent = 0
        self._last_contact = time.monotonic()  # the engine just sent EngineReady
        self._dead: str | None = None  # why the engine is dead
        self._dead_expected = False  # dead because shutdown() was called
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    def from_config(
        cls,
        config: EngineConfig,
        *,
        max_waiting_requests: int | None = None,
        health_timeout_s: float | None = DEFAULT_HEALTH_TIMEOUT_S,
        engine_stall_timeout_s: float | None = None,
    ) -> AsyncLLM:
        """Start the engine process (multiprocessing "spawn") and block until it has loaded the
        model.

        ``max_waiting_requests``: ``generate()`` raises QueueFullError while that many requests
        wait in the engine (not yet scheduled) or on their way to it.
        ``health_timeout_s``: ``check_health()`` raises EngineUnresponsiveError once the engine
        has been silent for longer (None: never).
        ``engine_stall_timeout_s``: an engine silent for longer is SIGKILLed and declared dead,
        failing every in-flight request with EngineDeadError (None, the default: never).
        """
        assert config.tokenizer is not None and config.model is not None
        _check_timeout("health_timeout_s", health_timeout_s)
        _check_timeout("engine_stall_timeout_s", engine_stall_timeout_s)
        tokenizer = load_tokenizer(config.tokenizer)
        defaults = load_generation_defaults(config.model, tokenizer)
        handle = EngineProcess(config)
        ready = handle.start()
        logger.info("Engine process %d is ready.", ready.pid)
        return cls(
            config,
            handle,
            tokenizer,
            defaults,
            ready.stats,
            max_waiting_requests,
            health_timeout_s=health_timeout_s,
            engine_stall_timeout_s=engine_stall_timeout_s,
        )

    # ---- requests --------------------------------------------------------------------------
    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        return tokenize_prompt(self.tokenizer, prompt)  # same as the engine's

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """The engine's checks: raise ValueError, or return the effective max_tokens."""
        return validate_request(self.config, prompt_token_ids, params)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
        *,
        priority: int = 0,
        request_timeout_s: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (per ``params.output_kind``) up to the finished one.

        Checked here, before anything is queued (on the first ``__anext__``): ValueError for an
        invalid or duplicate request (or a ``request_timeout_s`` <= 0), QueueFullError,
        EngineDeadError. Later failures raise from the iteration: ValueError / RuntimeError if
        the engine rejects the request, EngineDeadError if the engine dies (or stalls past
        ``engine_stall_timeout_s``), RequestTimeoutError once ``request_timeout_s`` has passed
        since this call (checked whenever the generator waits or is resumed, so a slow
        consumer's time counts too). If the request times out or the consumer stops early
        (cancelled task, ``aclose()``, garbage-collected generator), it is aborted in the
        engine.
        """
        self._start_reader()
        self._raise_if_dead()
        _check_timeout("request_timeout_s", request_timeout_s)
        if request_id in self._streams:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        prompt_ids = self.tokenize(prompt)
        self.validate(prompt_ids, params)
        self._check_queue()
        stream = _Stream(prompt if isinstance(prompt, str) else None, prompt_ids)
        self._streams[request_id] = stream
        timeout = _Timeout.arm(stream, request_id, request_timeout_s)
        done = False
        try:
            self._num_sent += 1
            self._send(AddRequest(request_id, prompt_ids, params, time.monotonic(), priority))
            while True:
                if timeout is not None and timeout.expired():
                    raise timeout.error
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    # Nothing of this request is left in the engine, unless it timed out.
                    done = timeout is None or item is not timeout.error
                    raise item
                done = item.finished
                yield item
                if done:
                    return
        finally:
            if timeout is not None:
                timeout.timer.cancel()
            if self._streams.get(request_id) is stream:
                del self._streams[request_id]
            if not done and self._dead is None:  # the consumer went away: free its blocks
                self._send(AbortRequests([request_id]))

    async def abort(self, request_id: str) -> None:
        """Abort a request; its ``generate()`` ends with a finish_reason="abort" output."""
        if self._dead is None:
            self._send(AbortRequests([request_id]))

    async def get_stats(self) -> dict[str, float]:
        """The engine's stats as of its last step (no round trip)."""
        self._start_reader()
        return dict(self._stats)

    # ---- health ----------------------------------------------------------------------------
    async def start_monitoring(self) -> None:
        """Start the reader on the running loop now rather than at the first request: death
        detection, ``on_engine_death``, heartbeats and ``engine_stall_timeout_s`` all depend on
        it. Idempotent; a server calls it at start-up."""
        self._start_reader()

    @property
    def is_running(self) -> bool:
        return self._dead is None and self._handle.proc.is_alive()

    @property
    def died_unexpectedly(self) -> bool:
        """True when the engine died or failed (EngineError, exited, killed, unreachable,
        stalled) before ``shutdown()`` was called; False while it runs and after a clean
        ``shutdown()``."""
        if self._dead is None:
            return not self._handle.closed and not self._handle.proc.is_alive()
        return not self._dead_expected

    @property
    def last_contact(self) -> float:
        """``time.monotonic()`` when the reader last received a message from the engine."""
        return self._last_contact

    def seconds_since_contact(self) -> float:
        """Seconds since the engine's last message (reading what has arrived first, unless the
        reader runs on another thread's loop)."""
        self._catch_up()
        return time.monotonic() - self._last_contact

    def is_wedged(self, timeout_s: float) -> bool:
        """True when the engine process is alive but nothing came from it for more than
        ``timeout_s``. A working engine is never silent that long: it sends outputs every step
        while requests are in flight (or sent but not yet seen) and a heartbeat every 0.5 s
        while idle, so this holds for a stopped or stuck engine whether or not it has work.
        False once it is dead or shut down (see ``is_running`` / ``died_unexpectedly``)."""
        silent = self.seconds_since_contact()
        return self._dead is None and silent > timeout_s and self._handle.proc.is_alive()

    async def check_health(self) -> None:
        """Raise EngineDeadError when the engine is dead or shut down, EngineUnresponsiveError
        when it has been silent for longer than ``health_timeout_s``. Never blocks."""
        self._start_reader()
        self._catch_up()
        self._raise_if_dead()
        limit = self.health_timeout_s
        if limit is not None and self.is_wedged(limit):
            raise EngineUnresponsiveError(
                f"No message from the engine process for {self.seconds_since_contact():.1f} s "
                f"(health_timeout_s={limit:g}): it is stopped or stuck."
            )

    def shutdown(self) -> None:
        """Stop the engine process and fail what is still in flight (idempotent). The engine
        gets ``Shutdown`` and is SIGKILLed if it has not exited within the grace period. An
        engine that had died before this call still counts as ``died_unexpectedly``."""
        if self._dead is None and not self._handle.closed:
            self._catch_up()  # e.g. an EngineError it sent before dying
            if self._dead is None and not self._handle.proc.is_alive():
                self._mark_dead(self._exit_message())
        self._mark_dead("The engine was shut down.", expected=True)
        task, self._reader = self._reader, None
        if task is not None and not task.done():
            loop = task.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(task.cancel)
        self._handle.close()

    # ---- internals -------------------------------------------------------------------------
    def _check_queue(self) -> None:
        if self.max_waiting_requests is None:
            return
        waiting = self._num_waiting()
        if waiting >= self.max_waiting_requests:
            raise QueueFullError(
                f"{waiting} requests are waiting (max_waiting_requests="
                f"{self.max_waiting_requests}); retry later."
            )

    def _num_waiting(self) -> int:
        """Waiting in the engine as of its last step, plus requests it has not seen yet."""
        unseen = self._num_sent - int(self._stats.get("requests_received_total", 0))
        return int(self._stats.get("num_waiting", 0)) + max(unseen, 0)

    def _send(self, msg: Any) -> None:
        try:
            self._handle.send(msg)
        except zmq.ZMQError as e:
            self._mark_dead(f"Cannot reach the engine process: {e}")
            if isinstance(msg, AddRequest):
                raise EngineDeadError(self._dead) from e

    def _raise_if_dead(self) -> None:
        if self._dead is None and not self._handle.proc.is_alive():
            self._mark_dead(self._exit_message())
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    def _exit_message(self) -> str:
        code = self._handle.proc.exitcode
        return f"The engine process died unexpectedly (exit code {code})."

    def _mark_dead(self, reason: str, *, expected: bool = False) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        self._dead_expected = expected
        for stream in self._streams.values():
            stream.queue.put_nowait(EngineDeadError(reason))
        if not expected:
            logger.error("Engine is dead: %s", reason)
            self._report_death(reason)

    def _report_death(self, reason: str) -> None:
        """Call ``on_engine_death`` on the event loop thread: here when already on it (or when
        no loop runs), else scheduled onto the reader's loop."""
        hook = self.on_engine_death
        if hook is None:
            return
        loop = self._reader.get_loop() if self._reader is not None else None
        if loop is not None and loop.is_running() and _running_loop() is not loop:
            loop.call_soon_threadsafe(_call_hook, hook, reason)
        else:
            _call_hook(hook, reason)

    def _start_reader(self) -> None:
        """Run the output-reading task on the current event loop (once per loop)."""
        loop = asyncio.get_running_loop()
        if self._dead is not None or self._handle.closed:
            return
        if self._reader is not None and self._reader.get_loop() is loop and not self._reader.done():
            return
        if self._handle.async_output is None:
            self._handle.async_output = zmq.asyncio.Socket.from_socket(self._handle.output)
        self._reader = loop.create_task(self._read_loop(), name="pagedllm-engine-outputs")

    async def _read_loop(self) -> None:
        sock = self._handle.async_output
        assert sock is not None
        try:
            while self._dead is None:
                if await sock.poll(_POLL_MS, zmq.POLLIN):
                    self._drain()
                elif not self._handle.proc.is_alive():
                    self._drain()  # whatever it sent before dying (e.g. an EngineError)
                    self._mark_dead(self._exit_message())
                self._check_stall()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here must not leave requests hanging
            logger.exception("The engine output reader failed")
            self._mark_dead(f"The engine output reader failed: {e!r}")

    def _check_stall(self) -> None:
        """Past ``engine_stall_timeout_s`` of silence, kill the engine and declare it dead."""
        limit = self.engine_stall_timeout_s
        if limit is None or self._dead is not None:
            return
        silent = self.seconds_since_contact()
        if silent > limit:
            self._handle.kill()
            self._mark_dead(
                f"No response from the engine process for {silent:.1f} s "
                f"(engine_stall_timeout_s={limit:g}); it was killed."
            )

    def _catch_up(self) -> None:
        """Read what the engine has sent, unless a reader running on another thread's loop
        owns the socket (the socket is not thread-safe)."""
        if self._dead is not None or self._handle.closed:
            return
        reader = self._reader
        if reader is not None and not reader.done():
            loop = reader.get_loop()
            if loop.is_running() and _running_loop() is not loop:
                return
        self._drain()

    def _drain(self) -> None:
        for msg in self._handle.messages():
            self._last_contact = time.monotonic()
            self._dispatch(msg)
            if self._dead is not None:
                return

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, EngineOutputs):
            self._stats = msg.stats
            for out in msg.outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:  # else: aborted, its consumer is gone
                    out.prompt = stream.prompt
                    out.prompt_token_ids = stream.prompt_token_ids
                    stream.queue.put_nowait(out)
        elif isinstance(msg, Heartbeat):
            if msg.stats is not None:
                self._stats = msg.stats
        elif isinstance(msg, RequestError):
            stream = self._streams.get(msg.request_id)
            if stream is not None:
                exc = ValueError if msg.error_type == "ValueError" else RuntimeError
                stream.queue.put_nowait(exc(msg.message))
        elif isinstance(msg, EngineError):
            logger.error("Engine process error:\n%s", msg.traceback)
            self._mark_dead(f"The engine process failed: {msg.message}")


def _call_hook(hook: Callable[[str], None], reason: str) -> None:
    try:
        hook(reason)
    except Exception:
        logger.exception("on_engine_death raised")
