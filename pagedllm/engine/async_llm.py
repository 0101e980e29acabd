"""``AsyncLLM``: an asyncio client for an engine running in its own process.

The API process (e.g. the HTTP server) tokenizes and validates requests itself, then sends
them to the engine process (``core_proc``) over a zmq PUSH socket. One background task reads
the engine's per-step ``EngineOutputs`` and routes each ``RequestOutput`` to the asyncio.Queue
of its request; ``generate()`` yields from that queue. The same task notices when the engine
process dies (fatal ``EngineError``, or the process is gone while no output arrives) and then
fails every in-flight request with ``EngineDeadError``.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import time
from collections.abc import AsyncIterator, Sequence
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
    RequestError,
    decode,
)
from pagedllm.engine.tokenizer import (
    GenerationDefaults,
    load_generation_defaults,
    load_tokenizer,
)
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_POLL_MS = 200  # with no output for this long, check whether the engine process is alive


class EngineDeadError(RuntimeError):
    """The engine process died or was shut down; nothing more will be generated."""


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_waiting_requests`` allows."""


@dataclass
class _Stream:
    prompt: str | None
    prompt_token_ids: list[int]
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)


class AsyncLLM:
    """Async front end of an engine process. Build it with ``AsyncLLM.from_config``."""

    def __init__(
        self,
        config: EngineConfig,
        handle: EngineProcess,
        tokenizer: PreTrainedTokenizerBase,
        generation_defaults: GenerationDefaults,
        stats: dict[str, float],
        max_waiting_requests: int | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.generation_defaults = generation_defaults
        self.max_waiting_requests = max_waiting_requests
        self._handle = handle
        self._stats = stats
        self._streams: dict[str, _Stream] = {}
        self._num_sent = 0
        self._dead: str | None = None  # why the engine is dead
        self._reader: asyncio.Task[None] | None = None
        atexit.register(handle.close)

    @classmethod
    def from_config(
        cls, config: EngineConfig, *, max_waiting_requests: int | None = None
    ) -> AsyncLLM:
        """Start the engine process (multiprocessing "spawn") and block until it has loaded the
        model. ``max_waiting_requests``: ``generate()`` raises QueueFullError while that many
        requests wait in the engine (not yet scheduled) or on their way to it."""
        assert config.tokenizer is not None and config.model is not None
        tokenizer = load_tokenizer(config.tokenizer)
        defaults = load_generation_defaults(config.model, tokenizer)
        handle = EngineProcess(config)
        ready = handle.start()
        logger.info("Engine process %d is ready.", ready.pid)
        return cls(config, handle, tokenizer, defaults, ready.stats, max_waiting_requests)

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
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (per ``params.output_kind``) up to the finished one.

        Checked here, before anything is queued (on the first ``__anext__``): ValueError for an
        invalid or duplicate request, QueueFullError, EngineDeadError. Later failures raise
        from the iteration: ValueError / RuntimeError if the engine rejects the request,
        EngineDeadError if the engine dies. If the consumer stops early (cancelled task,
        ``aclose()``, garbage-collected generator), the request is aborted in the engine.
        """
        self._start_reader()
        self._raise_if_dead()
        if request_id in self._streams:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        prompt_ids = self.tokenize(prompt)
        self.validate(prompt_ids, params)
        if self.max_waiting_requests is not None:
            waiting = self._num_waiting()
            if waiting >= self.max_waiting_requests:
                raise QueueFullError(
                    f"{waiting} requests are waiting (max_waiting_requests="
                    f"{self.max_waiting_requests}); retry later."
                )
        stream = _Stream(prompt if isinstance(prompt, str) else None, prompt_ids)
        self._streams[request_id] = stream
        done = False
        try:
            self._num_sent += 1
            self._send(AddRequest(request_id, prompt_ids, params, time.monotonic(), priority))
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    done = True  # nothing of this request is left in the engine
                    raise item
                done = item.finished
                yield item
                if done:
                    return
        finally:
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

    @property
    def is_running(self) -> bool:
        return self._dead is None and self._handle.proc.is_alive()

    async def check_health(self) -> None:
        self._raise_if_dead()

    def shutdown(self) -> None:
        """Stop the engine process and fail what is still in flight (idempotent)."""
        self._mark_dead("The engine was shut down.", log=False)
        task, self._reader = self._reader, None
        if task is not None and not task.done():
            loop = task.get_loop()
            if not loop.is_closed():
                loop.call_soon_threadsafe(task.cancel)
        self._handle.close()
        atexit.unregister(self._handle.close)

    # ---- internals -------------------------------------------------------------------------
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

    def _mark_dead(self, reason: str, log: bool = True) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        if log:
            logger.error("Engine is dead: %s", reason)
        for stream in self._streams.values():
            stream.queue.put_nowait(EngineDeadError(reason))

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
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here must not leave requests hanging
            logger.exception("The engine output reader failed")
            self._mark_dead(f"The engine output reader failed: {e!r}")

    def _drain(self) -> None:
        while self._dead is None:
            try:
                data = self._handle.output.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._dispatch(decode(data))

    def _dispatch(self, msg: Any) -> None:
        if isinstance(msg, EngineOutputs):
            self._stats = msg.stats
            for out in msg.outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:  # else: aborted, its consumer is gone
                    out.prompt = stream.prompt
                    out.prompt_token_ids = stream.prompt_token_ids
                    stream.queue.put_nowait(out)
        elif isinstance(msg, RequestError):
            stream = self._streams.get(msg.request_id)
            if stream is not None:
                exc = ValueError if msg.error_type == "ValueError" else RuntimeError
                stream.queue.put_nowait(exc(msg.message))
        elif isinstance(msg, EngineError):
            logger.error("Engine process error:\n%s", msg.traceback)
            self._mark_dead(f"The engine process failed: {msg.message}")
