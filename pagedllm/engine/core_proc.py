"""The engine process: ``run_engine_core`` runs ``LLMEngine`` in a loop (``EngineCore``) and
talks to the API process (``AsyncLLM``, through ``EngineProcess``) over two zmq sockets.

The engine gets a process of its own so that the API process's event loop never waits on a
model step, and so that a crashed or stuck engine can be detected and killed without taking
the server down. ``run_engine_core`` is the process entry point (multiprocessing "spawn"): it
binds a PULL socket for requests, connects a PUSH socket for results, builds the engine, sends
``EngineReady`` and then loops (``EngineCore.serve``):

1. drain every pending input message without blocking (add requests, aborts, shutdown);
2. if the engine has work, run one ``step()`` and send ONE ``EngineOutputs`` with all of that
   step's outputs and the current stats (``stats.EngineStats``);
3. when idle, send a ``Heartbeat`` every ``HEARTBEAT_INTERVAL_S`` (at once, with the stats, if
   they changed) and block in ``poll`` until the next one is due (no spinning). Silence from
   the engine therefore always means it is stopped or stuck, never that it has nothing to do.
   A busy engine sends no heartbeats: its per-step outputs are the sign of life.

The loop also ends when the parent process is gone. A request the engine rejects comes back as
a ``RequestError`` for that request alone. Any other exception is fatal: an ``EngineError`` with
the traceback is sent and the process exits with code 1.

Signals: the engine ignores SIGINT and SIGTERM. Both go to the whole process group (Ctrl-C,
systemd's KillMode=control-group), and stopping is the API process's call: it drains in-flight
requests first, then sends ``Shutdown``, and SIGKILLs an engine that has not exited after a
grace period (``EngineProcess.close``).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
import sys
import time
import traceback
from typing import TYPE_CHECKING, Any

import torch
import zmq

from pagedllm.config import EngineConfig
from pagedllm.engine.framing import Channel
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.messages import (
    AbortRequests,
    AddRequest,
    EngineError,
    EngineOutputs,
    EngineReady,
    Heartbeat,
    PrefixCacheReset,
    RequestError,
    ResetPrefixCache,
    Shutdown,
)
from pagedllm.engine.stats import EngineStats

if TYPE_CHECKING:
    from pagedllm.core.sequence import Sequence

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.5  # an idle engine says so this often (and checks its parent)
FINISH_REASONS = ("stop", "length", "abort")


class EngineCore:
    """The engine process's loop around an ``LLMEngine`` (``serve``): applies input messages,
    steps while there is work, sends one ``EngineOutputs`` per step and heartbeats while idle.

    It also keeps the cumulative counters that the stats carry (requests received and finished
    per reason, prompt and generation tokens, steps): ``LLMEngine`` forgets a request once it
    has finished. Everything it sends goes through ``out``; it knows nothing of processes, so
    tests drive it in a thread over inproc sockets.
    """

    def __init__(self, engine: LLMEngine, out: Channel) -> None:
        self.engine = engine
        self.out = out
        self._live: dict[str, list[Sequence]] = {}  # request id -> its n sequences
        self._unqueued: set[str] = set()  # live, but waiting for its grammar: no sequences yet
        self._prompt_counted: set[str] = set()
        self._finished_generation_tokens = 0
        self._last_sent = time.monotonic()
        self._last_stats: EngineStats | None = None  # as last sent
        self.requests_received = 0
        self.prompt_tokens = 0
        self.num_steps = 0
        self.finished_by_reason: dict[str, int] = dict.fromkeys(FINISH_REASONS, 0)  # completions

    # ---- input -----------------------------------------------------------------------------
    def add(self, msg: AddRequest) -> RequestError | None:
        self.requests_received += 1
        try:
            prompt: list[int] | dict[str, Any] = msg.prompt_token_ids
            if msg.mm_features:
                prompt = {"prompt_token_ids": msg.prompt_token_ids, "mm_features": msg.mm_features}
            self.engine.add_request(
                msg.request_id,
                prompt,
                msg.params,
                arrival_time=msg.arrival_time,
                priority=msg.priority,
                wait_for_grammar=False,  # a compiling grammar never holds up the others' steps
            )
        except Exception as e:  # this request only; the engine keeps serving the others
            # Any ValueError (JSONDecodeError, ...) is the request's fault: the API process
            # re-raises it as ValueError, so the client gets a 400 rather than a 500.
            kind = "ValueError" if isinstance(e, ValueError) else type(e).__name__
            return RequestError(msg.request_id, kind, str(e))
        state = self.engine.output_processor.states.get(msg.request_id)
        self._live[msg.request_id] = [s.seq for s in state.seqs] if state is not None else []
        if state is None:
            self._unqueued.add(msg.request_id)
        return None

    def abort(self, request_ids: list[str]) -> None:
        self.engine.abort_request(request_ids)

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> EngineOutputs | None:
        """One engine step's outputs; None when nothing is queued yet (only requests waiting
        for their grammar) and nothing came out."""
        queued = self.engine.has_queued_work()
        outputs = self.engine.step()
        for rid, e in self.engine.take_request_errors():  # a grammar that did not compile
            self._live.pop(rid, None)
            self._unqueued.discard(rid)
            self.send(RequestError(rid, "ValueError", str(e)))
        for rid in list(self._unqueued):  # queued once its grammar compiled (or aborted)
            state = self.engine.output_processor.states.get(rid)
            if state is not None:
                self._live[rid] = [s.seq for s in state.seqs]
                self._unqueued.discard(rid)
        if not outputs and not queued:
            return None
        self.num_steps += 1
        for out in outputs:
            out.prompt = None  # the API process restores both
            out.prompt_token_ids = []
            if out.finished:
                self._finish(out.request_id)
        return EngineOutputs(outputs, self.stats())

    def _count_prompt(self, request_id: str, seqs: list[Sequence]) -> None:
        """Prompt tokens count once the prompt has been computed (the first token exists)."""
        if request_id not in self._prompt_counted and seqs and seqs[0].num_output_tokens > 0:
            self._prompt_counted.add(request_id)
            self.prompt_tokens += seqs[0].num_prompt_tokens

    def _finish(self, request_id: str) -> None:
        seqs = self._live.pop(request_id, [])
        self._unqueued.discard(request_id)
        self._count_prompt(request_id, seqs)
        self._prompt_counted.discard(request_id)
        for seq in seqs:  # finish reasons are counted per completion (n > 1: n of them)
            self._finished_generation_tokens += seq.num_output_tokens
            reason = seq.status.finish_reason
            if reason is not None:
                self.finished_by_reason[reason] += 1

    def stats(self) -> EngineStats:
        """The engine's ``SchedulerStats`` plus this loop's counters, now."""
        generated = self._finished_generation_tokens
        for rid, seqs in self._live.items():
            self._count_prompt(rid, seqs)
            generated += sum(s.num_output_tokens for s in seqs)
        return EngineStats(
            **vars(self.engine.stats()),
            requests_received_total=self.requests_received,
            prompt_tokens_total=self.prompt_tokens,
            generation_tokens_total=generated,
            num_steps_total=self.num_steps,
            requests_finished_stop=self.finished_by_reason["stop"],
            requests_finished_length=self.finished_by_reason["length"],
            requests_finished_abort=self.finished_by_reason["abort"],
        )

    # ---- output ----------------------------------------------------------------------------
    def send(self, msg: Any) -> None:
        self.out.send(msg)
        self._last_sent = time.monotonic()
        stats = getattr(msg, "stats", None)
        if isinstance(stats, EngineStats):
            self._last_stats = stats

    def idle_report(self) -> None:
        """While idle: a Heartbeat with the stats at once if they changed (a rejected or
        aborted request), else a bare one when the interval is up."""
        stats = self.stats()
        if stats != self._last_stats:
            self.send(Heartbeat(stats))
        elif time.monotonic() - self._last_sent >= HEARTBEAT_INTERVAL_S:
            self.send(Heartbeat())

    def _ms_to_heartbeat(self) -> int:
        due = self._last_sent + HEARTBEAT_INTERVAL_S - time.monotonic()
        return max(0, math.ceil(due * 1000))

    # ---- the loop --------------------------------------------------------------------------
    def handle(self, msg: Any) -> bool:
        """Apply one input message; False means shut down."""
        if isinstance(msg, AddRequest):
            err = self.add(msg)
            if err is not None:
                self.send(err)
        elif isinstance(msg, AbortRequests):
            self.abort(msg.request_ids)
        elif isinstance(msg, ResetPrefixCache):
            self.send(PrefixCacheReset(msg.call_id, self.engine.reset_prefix_cache()))
        elif isinstance(msg, Shutdown):
            return False
        else:
            logger.warning("Engine process ignored an unknown message: %r", type(msg).__name__)
        return True

    def serve(self, inp: Channel, parent_pid: int) -> None:
        """Run until ``Shutdown`` arrives or the parent process is gone."""
        while os.getppid() == parent_pid:
            busy = self.engine.has_unfinished_requests()
            # Only grammars compiling: check on them every millisecond, not in a busy loop.
            wait_ms = (0 if self.engine.has_queued_work() else 1) if busy else None
            if inp.sock.poll(self._ms_to_heartbeat() if wait_ms is None else wait_ms, zmq.POLLIN):
                for msg in inp.messages():
                    if not self.handle(msg):
                        return
            if self.engine.has_unfinished_requests():
                outputs = self.step()
                if outputs is not None:
                    self.send(outputs)
            else:
                self.idle_report()
        logger.warning("Parent process %d is gone; the engine process exits.", parent_pid)


def run_engine_core(
    config: EngineConfig,
    input_addr: str,
    output_addr: str,
    parent_pid: int,
    key: bytes,
    num_threads: int | None = None,
) -> None:
    """Entry point of the engine process; never returns (``os._exit``)."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # the API process decides when to stop
        signal.signal(sig, signal.SIG_IGN)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s [engine] %(name)s: %(message)s"
        )
    if num_threads:
        torch.set_num_threads(num_threads)
    ctx = zmq.Context(io_threads=1)
    out_sock = ctx.socket(zmq.PUSH)
    out_sock.setsockopt(zmq.SNDHWM, 0)  # never drop or block on outputs
    out_sock.setsockopt(zmq.LINGER, 2000)  # flush a final EngineError before exiting
    out_sock.connect(output_addr)
    out = Channel(out_sock, key)
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.RCVHWM, 0)
    inp.setsockopt(zmq.LINGER, 0)
    failed = False
    engine: LLMEngine | None = None
    try:
        inp.bind(input_addr)
        config = EngineConfig(**config.to_kwargs())  # re-validate (device "auto") here
        engine = LLMEngine(config)
        core = EngineCore(engine, out)
        # What start-up built (model, graphs, tokenizer) lives as long as this process: move it
        # out of the cyclic collector's sight, whose full passes over it otherwise stall a
        # step by a quarter second now and then (measured on the CPU demo model).
        gc.collect()
        gc.freeze()
        core.send(EngineReady(os.getpid(), core.stats()))
        profile_path = os.environ.get("PAGEDLLM_ENGINE_CPROFILE")
        if profile_path:  # a developer's view of the engine loop's host time
            import cProfile

            profiler = cProfile.Profile()
            try:
                profiler.runcall(core.serve, Channel(inp, key), parent_pid)
            finally:
                profiler.dump_stats(profile_path)
        else:
            core.serve(Channel(inp, key), parent_pid)
    except BaseException as e:
        failed = True
        logger.exception("Engine process failed")
        out.send(EngineError(f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        if engine is not None:
            engine.shutdown()  # tensor-parallel workers, if any
        inp.close()
        out_sock.close()
        ctx.term()
    # Nothing is left to clean up: skip the interpreter teardown, which takes ~1 s with torch.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failed else 0)
