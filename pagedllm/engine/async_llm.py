"""``AsyncLLM``: an asyncio client for an engine running in its own process.

The server needs an engine it can share between many concurrent requests without ever blocking
its event loop on a model step. So the engine runs in a process of its own (``core_proc``,
started and stopped by ``EngineProcess``), and this client only exchanges messages with it:
the API process tokenizes and validates each request itself and sends it over zmq; the reader
task (``EngineMonitor``) hands each of the engine's per-step ``EngineOutputs`` to ``_dispatch``,
which puts every output into the ``RequestStream`` that its ``generate()`` call waits on.

The rule throughout is that a request never waits forever:

* the engine dies or stalls: ``EngineMonitor`` notices, and every in-flight request fails with
  ``EngineDeadError`` (see ``engine_monitor`` for how, and for ``check_health``);
* ``generate(request_timeout_s=...)`` bounds one request: past it, the request is aborted in
  the engine and ``RequestTimeoutError`` is raised;
* a consumer that goes away (cancelled, ``aclose()``, garbage-collected) aborts its request.

Each ``generate()`` call gets an engine-side id of its own (``<request_id>@<n>``), so a
request id can be reused as soon as its ``generate()`` has ended: outputs still on their way
for the old request, and an abort meant for it, cannot reach the new one.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import zmq
from transformers import PreTrainedTokenizerBase

from pagedllm.config import EngineConfig
from pagedllm.engine.engine_monitor import EngineMonitor, check_timeout
from pagedllm.engine.engine_process import EngineProcess
from pagedllm.engine.errors import (
    EngineDeadError,
    EngineUnresponsiveError,
    QueueFullError,
    RequestTimeoutError,
)
from pagedllm.engine.input_processing import InputProcessor
from pagedllm.engine.messages import (
    AbortRequests,
    AddRequest,
    EngineOutputs,
    Heartbeat,
    PrefixCacheReset,
    RequestError,
    ResetPrefixCache,
)
from pagedllm.engine.request_stream import RequestStream
from pagedllm.engine.stats import EngineStats
from pagedllm.engine.tokenizer import GenerationDefaults, load_generation_defaults, load_tokenizer
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

__all__ = [
    "DEFAULT_HEALTH_TIMEOUT_S",
    "AsyncLLM",
    "EngineDeadError",
    "EngineUnresponsiveError",
    "QueueFullError",
    "RequestTimeoutError",
]

logger = logging.getLogger(__name__)

DEFAULT_HEALTH_TIMEOUT_S = 10.0  # 20 missed heartbeats; far above any normal step


class AsyncLLM:
    """Async front end of an engine process. Build it with ``AsyncLLM.from_config``, start
    monitoring with ``start_monitoring()``, stream with ``generate()``, stop with
    ``shutdown()``.

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
        stats: EngineStats,
        max_waiting_requests: int | None = None,
        *,
        health_timeout_s: float | None = DEFAULT_HEALTH_TIMEOUT_S,
        engine_stall_timeout_s: float | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.input_processor = InputProcessor(config, tokenizer)  # the engine's checks
        self.generation_defaults = generation_defaults
        self.max_waiting_requests = max_waiting_requests
        self.health_timeout_s = check_timeout("health_timeout_s", health_timeout_s)
        self._handle = handle
        self._stats = stats
        self._streams: dict[str, RequestStream] = {}  # by request id
        self._calls: dict[str, asyncio.Future[bool]] = {}  # control calls awaiting an answer
        self._num_sent = 0
        self._monitor = EngineMonitor(
            handle,
            self._dispatch,
            self._fail_requests,
            engine_stall_timeout_s=engine_stall_timeout_s,
        )

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
        mc = config.model_config
        assert mc.tokenizer is not None and mc.model is not None
        check_timeout("health_timeout_s", health_timeout_s)
        check_timeout("engine_stall_timeout_s", engine_stall_timeout_s)
        tokenizer = load_tokenizer(mc.tokenizer)
        defaults = load_generation_defaults(mc.model, tokenizer)
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
        invalid request (``input_processor``: the engine's own checks, the priority included),
        an id that is in flight, or a ``request_timeout_s`` <= 0;
        QueueFullError; EngineDeadError. Later failures raise from the iteration: ValueError /
        RuntimeError if the engine rejects the request, EngineDeadError if the engine dies (or
        stalls past ``engine_stall_timeout_s``), RequestTimeoutError once
        ``request_timeout_s`` has passed since this call (checked whenever the generator waits
        or is resumed, so a slow consumer's time counts too). If the request times out or the
        consumer stops early (cancelled task, ``aclose()``, garbage-collected generator), it is
        aborted in the engine.
        """
        self._monitor.start()
        self._monitor.raise_if_dead()
        check_timeout("request_timeout_s", request_timeout_s)
        if request_id in self._streams:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        prompt_ids = self.input_processor.process(prompt, params, priority).prompt_token_ids
        self._check_queue()
        self._num_sent += 1
        engine_id = f"{request_id}@{self._num_sent}"
        text = prompt if isinstance(prompt, str) else None
        stream = RequestStream(request_id, engine_id, text, prompt_ids, request_timeout_s)
        self._streams[request_id] = stream
        finished = False
        try:
            self._send(AddRequest(engine_id, prompt_ids, params, time.monotonic(), priority))
            while not finished:
                out = await stream.next_output()
                finished = out.finished
                yield out
        finally:
            stream.close()
            del self._streams[request_id]
            # Gone early, timed out or rejected: free its KV blocks (an unknown id is a no-op).
            if not finished and self._monitor.dead is None:
                self._send(AbortRequests([engine_id]))

    async def abort(self, request_id: str) -> None:
        """Abort a request in flight; its ``generate()`` ends with a finish_reason="abort"
        output. Does nothing for an id that is not in flight."""
        stream = self._streams.get(request_id)
        if stream is not None and self._monitor.dead is None:
            self._send(AbortRequests([stream.engine_id]))

    async def reset_prefix_cache(self, timeout_s: float = 30.0) -> bool:
        """Ask the engine to forget every cached prefix block. False when requests are in
        flight (their blocks are in use: nothing is dropped). EngineDeadError if the engine
        is gone; TimeoutError if it does not answer within ``timeout_s``."""
        self._monitor.start()
        if self._monitor.dead is not None:
            raise EngineDeadError(self._monitor.dead)
        call_id = uuid.uuid4().hex
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = answer
        try:
            self._send(ResetPrefixCache(call_id))
            return await asyncio.wait_for(answer, timeout_s)
        finally:
            self._calls.pop(call_id, None)

    async def get_stats(self) -> EngineStats:
        """The engine's stats as of its last step, or its last report while idle (no round
        trip). Frozen: later reports replace the object, never change it."""
        self._monitor.start()
        return self._stats

    # ---- health (see engine_monitor) -------------------------------------------------------
    async def start_monitoring(self) -> None:
        """Start the reader on the running loop now rather than at the first request: death
        detection, ``on_engine_death``, heartbeats and ``engine_stall_timeout_s`` all depend on
        it. Idempotent; a server calls it at start-up."""
        self._monitor.start()

    async def check_health(self) -> None:
        """Raise EngineDeadError when the engine is dead or shut down, EngineUnresponsiveError
        when it has been silent for longer than ``health_timeout_s``. Never blocks."""
        self._monitor.start()
        self._monitor.check_health(self.health_timeout_s)

    @property
    def is_running(self) -> bool:
        return self._monitor.is_running

    @property
    def died_unexpectedly(self) -> bool:
        """True when the engine died or failed (EngineError, exited, killed, unreachable,
        stalled) before ``shutdown()`` was called; False while it runs and after a clean
        ``shutdown()``."""
        return self._monitor.died_unexpectedly

    @property
    def last_contact(self) -> float:
        """``time.monotonic()`` when the reader last received a message from the engine."""
        return self._monitor.last_contact

    def seconds_since_contact(self) -> float:
        """Seconds since the engine's last message (reading what has arrived first, unless the
        reader runs on another thread's loop)."""
        return self._monitor.seconds_since_contact()

    def is_wedged(self, timeout_s: float) -> bool:
        """True when the engine process is alive but nothing came from it for more than
        ``timeout_s``: it is stopped or stuck, whether or not it has work. False once it is
        dead or shut down (see ``is_running`` / ``died_unexpectedly``)."""
        return self._monitor.is_wedged(timeout_s)

    @property
    def engine_stall_timeout_s(self) -> float | None:
        return self._monitor.engine_stall_timeout_s

    @engine_stall_timeout_s.setter
    def engine_stall_timeout_s(self, value: float | None) -> None:
        self._monitor.engine_stall_timeout_s = check_timeout("engine_stall_timeout_s", value)

    @property
    def on_engine_death(self) -> Callable[[str], None] | None:
        return self._monitor.on_engine_death

    @on_engine_death.setter
    def on_engine_death(self, hook: Callable[[str], None] | None) -> None:
        self._monitor.on_engine_death = hook

    def shutdown(self) -> None:
        """Stop the engine process and fail what is still in flight (idempotent). The engine
        gets ``Shutdown`` and is SIGKILLed if it has not exited within the grace period. An
        engine that had died before this call still counts as ``died_unexpectedly``."""
        self._monitor.stop()
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
        unseen = self._num_sent - self._stats.requests_received_total
        return self._stats.num_waiting + max(unseen, 0)

    def _send(self, msg: Any) -> None:
        try:
            self._handle.send(msg)
        except zmq.ZMQError as e:
            self._monitor.mark_dead(f"Cannot reach the engine process: {e}")
            if isinstance(msg, AddRequest):
                raise EngineDeadError(self._monitor.dead) from e

    def _stream_of(self, engine_id: str) -> RequestStream | None:
        """The stream of this very ``generate()`` call, if it is still in flight."""
        stream = self._streams.get(engine_id.rpartition("@")[0])
        return stream if stream is not None and stream.engine_id == engine_id else None

    def _dispatch(self, msg: Any) -> None:
        """Route one message from the engine (called by the reader)."""
        if isinstance(msg, EngineOutputs):
            self._stats = msg.stats
            for out in msg.outputs:
                stream = self._stream_of(out.request_id)
                if stream is not None:  # else: aborted, its consumer is gone
                    stream.put(out)
        elif isinstance(msg, Heartbeat):
            if msg.stats is not None:
                self._stats = msg.stats
        elif isinstance(msg, PrefixCacheReset):
            call = self._calls.get(msg.call_id)
            if call is not None and not call.done():
                call.set_result(msg.ok)
        elif isinstance(msg, RequestError):
            stream = self._stream_of(msg.request_id)
            if stream is not None:
                exc = ValueError if msg.error_type == "ValueError" else RuntimeError
                stream.fail(exc(msg.message))

    def _fail_requests(self, reason: str) -> None:
        """The engine is dead: every request in flight ends with EngineDeadError."""
        for call in self._calls.values():
            if not call.done():
                call.set_exception(EngineDeadError(reason))
        for stream in self._streams.values():
            stream.fail(EngineDeadError(reason))
