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

Data parallelism (``data_parallel_size`` N > 1): N engine processes (``replicas``) stand
behind this one client; each request goes to the replica its ``router`` picks
(``pagedllm.router``: cache-aware on the prompt's block hashes by default). A replica that dies
fails only the requests it had, and the others go on serving: ``is_running`` and
``check_health`` hold while one replica serves, ``died_unexpectedly`` tells that one died, and
``on_engine_death`` is called for each (so ``--exit-on-engine-death`` stops at the first).

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
from functools import partial
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
from pagedllm.engine.input_processing import InputProcessor, PromptInput
from pagedllm.engine.messages import (
    AbortRequests,
    AddRequest,
    EngineOutputs,
    Heartbeat,
    PrefixCacheReset,
    RequestError,
    ResetPrefixCache,
)
from pagedllm.engine.replicas import (
    EngineReplica,
    check_replicas_health,
    live_replicas,
    num_waiting,
    prompt_block_hashes,
    start_engines,
    stop_replicas,
    sum_stats,
)
from pagedllm.engine.request_stream import RequestStream
from pagedllm.engine.stats import EngineStats
from pagedllm.engine.tokenizer import GenerationDefaults, load_generation_defaults, load_tokenizer
from pagedllm.outputs import RequestOutput
from pagedllm.router.policies import CacheAwareConfig, CacheAwarePolicy, Router, build_policy
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
    """Async front end of one or more engine processes. Build it with ``AsyncLLM.from_config``,
    start monitoring with ``start_monitoring()``, stream with ``generate()``, stop with
    ``shutdown()``.

    Settable attributes: ``max_waiting_requests``, ``health_timeout_s``,
    ``engine_stall_timeout_s`` and ``on_engine_death`` (a ``Callable[[str], None]`` called once
    per engine process, with the reason, when it dies before ``shutdown()``; on the event loop
    thread; its exceptions are logged).
    """

    def __init__(
        self,
        config: EngineConfig,
        handles: EngineProcess | list[EngineProcess],
        tokenizer: PreTrainedTokenizerBase,
        generation_defaults: GenerationDefaults,
        stats: EngineStats | list[EngineStats],
        max_waiting_requests: int | None = None,
        *,
        health_timeout_s: float | None = DEFAULT_HEALTH_TIMEOUT_S,
        engine_stall_timeout_s: float | None = None,
        router: Router | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.input_processor = InputProcessor(config, tokenizer)  # the engine's checks
        self.generation_defaults = generation_defaults
        self.max_waiting_requests = max_waiting_requests
        self.health_timeout_s = check_timeout("health_timeout_s", health_timeout_s)
        handles = handles if isinstance(handles, list) else [handles]
        all_stats = stats if isinstance(stats, list) else [stats]
        self.replicas = [
            EngineReplica(i, h, st)
            for i, (h, st) in enumerate(zip(handles, all_stats, strict=True))
        ]
        self.router = router or Router(build_policy("cache_aware"), range(len(self.replicas)))
        self._block_size = config.cache_config.block_size
        self._streams: dict[str, RequestStream] = {}  # by request id
        self._where: dict[str, EngineReplica] = {}  # request id -> its replica
        self._calls: dict[str, tuple[EngineReplica, asyncio.Future[bool]]] = {}  # control calls
        self._on_engine_death: Callable[[str], None] | None = None
        self._num_calls = 0  # generate() calls: the engine-side ids' suffix
        for r in self.replicas:
            r.monitor = EngineMonitor(
                r.handle,
                partial(self._dispatch, r),
                partial(self._fail_requests, r),
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
        data_parallel_size: int | None = None,
        router_policy: str = "cache_aware",
        router_config: CacheAwareConfig | None = None,
    ) -> AsyncLLM:
        """Start the engine processes (multiprocessing "spawn"; ``data_parallel_size`` of them)
        and block until they have loaded the model.

        ``max_waiting_requests``: ``generate()`` raises QueueFullError while that many requests
        wait in the engines (not yet scheduled) or on their way to them.
        ``health_timeout_s``: ``check_health()`` raises EngineUnresponsiveError once the engine
        has been silent for longer (None: never).
        ``engine_stall_timeout_s``: an engine silent for longer is SIGKILLed and declared dead,
        failing every request in flight on it with EngineDeadError (None, the default: never).
        ``data_parallel_size``: engine processes to start (default: the config's); each is a
        replica with its own KV cache (and GPUs). ``router_policy`` / ``router_config``: how
        requests are spread over them (``pagedllm.router.policies``).
        """
        mc = config.model_config
        assert mc.tokenizer is not None and mc.model is not None
        check_timeout("health_timeout_s", health_timeout_s)
        check_timeout("engine_stall_timeout_s", engine_stall_timeout_s)
        dp = data_parallel_size
        if dp is None:
            dp = config.parallel_config.data_parallel_size
        policy = build_policy(router_policy, router_config, unit=config.cache_config.block_size)
        tokenizer = load_tokenizer(mc.tokenizer)
        defaults = load_generation_defaults(mc.model, tokenizer)
        started = start_engines(config, dp)
        return cls(
            config,
            [h for h, _ in started],
            tokenizer,
            defaults,
            [st for _, st in started],
            max_waiting_requests,
            health_timeout_s=health_timeout_s,
            engine_stall_timeout_s=engine_stall_timeout_s,
            router=Router(policy, range(dp)),
        )

    @property
    def _handle(self) -> EngineProcess:
        """The first replica's process (the only one without data parallelism)."""
        return self.replicas[0].handle

    # ---- requests --------------------------------------------------------------------------
    async def generate(
        self,
        prompt: PromptInput,
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
        QueueFullError; EngineDeadError (no replica is alive). Later failures raise from the
        iteration: ValueError / RuntimeError if the engine rejects the request,
        EngineDeadError if its engine dies (or stalls past ``engine_stall_timeout_s``),
        RequestTimeoutError once ``request_timeout_s`` has passed since this call (checked
        whenever the generator waits or is resumed, so a slow consumer's time counts too). If
        the request times out or the consumer stops early (cancelled task, ``aclose()``,
        garbage-collected generator), it is aborted in the engine.
        """
        self._start_monitors()
        live = live_replicas(self.replicas, self.health_timeout_s)
        check_timeout("request_timeout_s", request_timeout_s)
        if request_id in self._streams:
            raise ValueError(f"Request id {request_id!r} is already in use.")
        inp = self.input_processor.process(prompt, params, priority)
        prompt_ids = inp.prompt_token_ids
        self._check_queue()
        replica = self._route(prompt_ids, live)
        replica.num_sent += 1
        self._num_calls += 1
        engine_id = f"{request_id}@{self._num_calls}"
        text = prompt if isinstance(prompt, str) else None
        stream = RequestStream(request_id, engine_id, text, prompt_ids, request_timeout_s)
        self._streams[request_id] = stream
        self._where[request_id] = replica
        finished = False
        try:
            self._send(
                replica,
                AddRequest(
                    engine_id, prompt_ids, params, time.monotonic(), priority, inp.mm_features
                ),
            )
            while not finished:
                out = await stream.next_output()
                finished = out.finished
                yield out
        finally:
            stream.close()
            del self._streams[request_id]
            del self._where[request_id]
            self.router.done(replica.index)
            # Gone early, timed out or rejected: free its KV blocks (an unknown id is a no-op).
            if not finished and replica.monitor.dead is None:
                self._send(replica, AbortRequests([engine_id]))

    async def abort(self, request_id: str) -> None:
        """Abort a request in flight; its ``generate()`` ends with a finish_reason="abort"
        output. Does nothing for an id that is not in flight."""
        stream = self._streams.get(request_id)
        replica = self._where.get(request_id)
        if stream is not None and replica is not None and replica.monitor.dead is None:
            self._send(replica, AbortRequests([stream.engine_id]))

    async def reset_prefix_cache(self, timeout_s: float = 30.0) -> bool:
        """Ask every live engine to forget every cached prefix block. False when requests are
        in flight (their blocks are in use: nothing is dropped). EngineDeadError if no engine
        is alive; TimeoutError if one does not answer within ``timeout_s``."""
        self._start_monitors()
        live = [r for r in self.replicas if r.monitor.dead is None]
        if not live:
            raise EngineDeadError(self.replicas[0].monitor.dead)
        oks = await asyncio.gather(*(self._reset_one(r, timeout_s) for r in live))
        if all(oks):
            self.router.policy.reset()
        return all(oks)

    async def _reset_one(self, replica: EngineReplica, timeout_s: float) -> bool:
        call_id = uuid.uuid4().hex
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = (replica, answer)
        try:
            self._send(replica, ResetPrefixCache(call_id))
            return await asyncio.wait_for(answer, timeout_s)
        finally:
            self._calls.pop(call_id, None)

    async def get_stats(self) -> EngineStats:
        """The engines' stats as of their last step, or their last report while idle (no round
        trip), summed over the replicas. Frozen: later reports replace the object."""
        self._start_monitors()
        alive = [r.monitor.dead is None for r in self.replicas]
        return sum_stats([r.stats for r in self.replicas], alive)

    async def get_replica_stats(self) -> list[tuple[EngineStats, bool]]:
        """Each replica's last stats and whether it is alive, in replica order."""
        self._start_monitors()
        return [(r.stats, r.monitor.is_running) for r in self.replicas]

    # ---- health (see engine_monitor) -------------------------------------------------------
    async def start_monitoring(self) -> None:
        """Start the readers on the running loop now rather than at the first request: death
        detection, ``on_engine_death``, heartbeats and ``engine_stall_timeout_s`` all depend on
        it. Idempotent; a server calls it at start-up."""
        self._start_monitors()

    async def check_health(self) -> None:
        """Raise when no replica serves: EngineUnresponsiveError when a live one has been
        silent for longer than ``health_timeout_s``, else EngineDeadError. Never blocks."""
        self._start_monitors()
        check_replicas_health(self.replicas, self.health_timeout_s)

    @property
    def is_running(self) -> bool:
        """True while at least one engine process runs."""
        return any(r.monitor.is_running for r in self.replicas)

    @property
    def died_unexpectedly(self) -> bool:
        """True when an engine died or failed (EngineError, exited, killed, unreachable,
        stalled) before ``shutdown()`` was called; False while all run and after a clean
        ``shutdown()``."""
        return any(r.monitor.died_unexpectedly for r in self.replicas)

    @property
    def last_contact(self) -> float:
        """``time.monotonic()`` when a reader last received a message from an engine."""
        return max(r.monitor.last_contact for r in self.replicas)

    def seconds_since_contact(self) -> float:
        """Seconds since the last message of the most recently heard engine (reading what has
        arrived first, unless the reader runs on another thread's loop)."""
        return min(r.monitor.seconds_since_contact() for r in self.replicas)

    def is_wedged(self, timeout_s: float) -> bool:
        """True when every running engine process is alive but sent nothing for more than
        ``timeout_s``: stopped or stuck, whether or not it has work. False when none runs
        (see ``is_running`` / ``died_unexpectedly``)."""
        running = [r for r in self.replicas if r.monitor.is_running]
        return bool(running) and all(r.monitor.is_wedged(timeout_s) for r in running)

    @property
    def engine_stall_timeout_s(self) -> float | None:
        return self.replicas[0].monitor.engine_stall_timeout_s

    @engine_stall_timeout_s.setter
    def engine_stall_timeout_s(self, value: float | None) -> None:
        check_timeout("engine_stall_timeout_s", value)
        for r in self.replicas:
            r.monitor.engine_stall_timeout_s = value

    @property
    def on_engine_death(self) -> Callable[[str], None] | None:
        return self._on_engine_death

    @on_engine_death.setter
    def on_engine_death(self, hook: Callable[[str], None] | None) -> None:
        self._on_engine_death = hook
        for r in self.replicas:
            r.monitor.on_engine_death = None if hook is None else partial(self._died, r, hook)

    def shutdown(self) -> None:
        """Stop the engine processes and fail what is still in flight (idempotent). Each engine
        gets ``Shutdown`` (all at once) and is SIGKILLed if it has not exited within the grace
        period. An engine that had died before this call still counts as
        ``died_unexpectedly``."""
        stop_replicas(self.replicas)

    # ---- internals -------------------------------------------------------------------------
    def _start_monitors(self) -> None:
        for r in self.replicas:
            r.monitor.start()

    def _route(self, prompt_ids: list[int], live: list[EngineReplica]) -> EngineReplica:
        if len(self.replicas) == 1:
            return live[0]
        key: tuple[bytes, ...] = ()
        if isinstance(self.router.policy, CacheAwarePolicy):
            key = prompt_block_hashes(prompt_ids, self._block_size)
        index = self.router.route(key, len(prompt_ids), [r.index for r in live])
        return self.replicas[int(index)]  # type: ignore[call-overload]

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
        return num_waiting(self.replicas)

    def _send(self, replica: EngineReplica, msg: Any) -> None:
        try:
            replica.handle.send(msg)
        except zmq.ZMQError as e:
            replica.monitor.mark_dead(f"Cannot reach the engine process: {e}")
            if isinstance(msg, AddRequest):
                raise EngineDeadError(replica.monitor.dead) from e

    def _stream_of(self, engine_id: str) -> RequestStream | None:
        """The stream of this very ``generate()`` call, if it is still in flight."""
        stream = self._streams.get(engine_id.rpartition("@")[0])
        return stream if stream is not None and stream.engine_id == engine_id else None

    def _dispatch(self, replica: EngineReplica, msg: Any) -> None:
        """Route one message from ``replica``'s engine (called by its reader)."""
        if isinstance(msg, EngineOutputs):
            replica.stats = msg.stats
            for out in msg.outputs:
                stream = self._stream_of(out.request_id)
                if stream is not None:  # else: aborted, its consumer is gone
                    stream.put(out)
        elif isinstance(msg, Heartbeat):
            if msg.stats is not None:
                replica.stats = msg.stats
        elif isinstance(msg, PrefixCacheReset):
            call = self._calls.get(msg.call_id)
            if call is not None and not call[1].done():
                call[1].set_result(msg.ok)
        elif isinstance(msg, RequestError):
            stream = self._stream_of(msg.request_id)
            if stream is not None:
                exc = ValueError if msg.error_type == "ValueError" else RuntimeError
                stream.fail(exc(msg.message))

    def _reason(self, replica: EngineReplica, reason: str) -> str:
        return reason if len(self.replicas) == 1 else f"Engine {replica.name}: {reason}"

    def _died(self, replica: EngineReplica, hook: Callable[[str], None], reason: str) -> None:
        hook(self._reason(replica, reason))

    def _fail_requests(self, replica: EngineReplica, reason: str) -> None:
        """``replica``'s engine is dead: each request in flight there ends with
        EngineDeadError, and the router sends it nothing more."""
        reason = self._reason(replica, reason)
        if len(self.replicas) > 1 and not replica.monitor.dead_expected:
            self.router.remove(replica.index)
        for owner, call in self._calls.values():
            if owner is replica and not call.done():
                call.set_exception(EngineDeadError(reason))
        for request_id, stream in self._streams.items():
            if self._where.get(request_id) is replica:
                stream.fail(EngineDeadError(reason))
