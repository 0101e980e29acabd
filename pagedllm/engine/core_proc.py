"""The engine process: runs ``LLMEngine`` in a loop and talks to ``AsyncLLM`` over zmq.

``EngineProcess`` is the API process's handle: it creates the sockets in a temp dir, starts the
process and waits for it to be ready, and shuts everything down (idempotently).

``run_engine_core`` is the process entry point (started with multiprocessing "spawn"). It binds
a PULL socket for requests, connects a PUSH socket for results, builds the engine, sends
``EngineReady`` and then loops:

1. drain every pending input message without blocking (add requests, aborts, shutdown);
2. if the engine has work, run one ``step()`` and send ONE ``EngineOutputs`` with all of that
   step's outputs and the current stats;
3. when idle, block in ``poll`` (no spinning) and wake up periodically only to check that the
   parent process is still alive (the engine exits when its parent is gone).

A request the engine rejects comes back as a ``RequestError`` for that request alone. Any
exception in ``step()`` is fatal: an ``EngineError`` with the traceback is sent and the process
exits with code 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import traceback
from typing import Any

import torch
import zmq
import zmq.asyncio

from pagedllm.config import EngineConfig
from pagedllm.core.request import Request
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.messages import (
    AbortRequests,
    AddRequest,
    EngineError,
    EngineOutputs,
    EngineReady,
    RequestError,
    Shutdown,
    decode,
    encode,
)

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 500  # how often an idle engine checks that its parent is alive
READY_POLL_MS = 200  # how often the API process checks the engine while it starts
FINISH_REASONS = ("stop", "length", "abort")


class EngineCore:
    """Wraps an ``LLMEngine``: applies input messages, steps, and keeps cumulative counters."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._live: dict[str, list[Request]] = {}  # request id -> its n sequences
        self._prompt_counted: set[str] = set()
        self._finished_generation_tokens = 0
        self.counters: dict[str, int] = {
            "prompt_tokens_total": 0,
            "requests_received_total": 0,
            "num_steps_total": 0,
            **{f"requests_finished_{r}": 0 for r in FINISH_REASONS},
        }

    # ---- input -----------------------------------------------------------------------------
    def add(self, msg: AddRequest) -> RequestError | None:
        self.counters["requests_received_total"] += 1
        try:
            self.engine.add_request(
                msg.request_id,
                msg.prompt_token_ids,
                msg.params,
                arrival_time=msg.arrival_time,
                priority=msg.priority,
            )
        except Exception as e:  # this request only; the engine keeps serving the others
            return RequestError(msg.request_id, type(e).__name__, str(e))
        state = self.engine.output_processor.states.get(msg.request_id)
        self._live[msg.request_id] = [s.seq for s in state.seqs] if state is not None else []
        return None

    def abort(self, request_ids: list[str]) -> None:
        self.engine.abort_request(request_ids)

    # ---- one step --------------------------------------------------------------------------
    def step(self) -> EngineOutputs:
        outputs = self.engine.step()
        self.counters["num_steps_total"] += 1
        for out in outputs:
            out.prompt = None  # the API process restores both
            out.prompt_token_ids = []
            if out.finished:
                self._finish(out.request_id)
        return EngineOutputs(outputs, self.stats())

    def _count_prompt(self, request_id: str, seqs: list[Request]) -> None:
        """Prompt tokens count once the prompt has been computed (the first token exists)."""
        if request_id not in self._prompt_counted and seqs and seqs[0].num_output_tokens > 0:
            self._prompt_counted.add(request_id)
            self.counters["prompt_tokens_total"] += seqs[0].num_prompt_tokens

    def _finish(self, request_id: str) -> None:
        seqs = self._live.pop(request_id, [])
        self._count_prompt(request_id, seqs)
        self._prompt_counted.discard(request_id)
        for seq in seqs:  # finish reasons are counted per completion (n > 1: n of them)
            self._finished_generation_tokens += seq.num_output_tokens
            reason = seq.status.finish_reason
            if reason is not None:
                key = f"requests_finished_{reason}"
                self.counters[key] = self.counters.get(key, 0) + 1

    def stats(self) -> dict[str, float]:
        generated = self._finished_generation_tokens
        for rid, seqs in self._live.items():
            self._count_prompt(rid, seqs)
            generated += sum(s.num_output_tokens for s in seqs)
        stats: dict[str, float] = dict(self.engine.stats())
        stats.update({k: float(v) for k, v in self.counters.items()})
        stats["generation_tokens_total"] = float(generated)
        stats["num_unfinished_requests"] = float(self.engine.get_num_unfinished_requests())
        return stats

    # ---- the loop --------------------------------------------------------------------------
    def handle(self, msg: Any, out: zmq.Socket) -> bool:
        """Apply one input message; False means shut down."""
        if isinstance(msg, AddRequest):
            err = self.add(msg)
            if err is not None:
                out.send(encode(err))
        elif isinstance(msg, AbortRequests):
            self.abort(msg.request_ids)
        elif isinstance(msg, Shutdown):
            return False
        else:
            logger.warning("Engine process ignored an unknown message: %r", type(msg).__name__)
        return True

    def serve(self, inp: zmq.Socket, out: zmq.Socket, parent_pid: int) -> None:
        """Run until ``Shutdown`` arrives or the parent process is gone."""
        while os.getppid() == parent_pid:
            busy = self.engine.has_unfinished_requests()
            if inp.poll(0 if busy else IDLE_POLL_MS, zmq.POLLIN):
                while True:
                    try:
                        data = inp.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if not self.handle(decode(data), out):
                        return
            if self.engine.has_unfinished_requests():
                out.send(encode(self.step()))
        logger.warning("Parent process %d is gone; the engine process exits.", parent_pid)


def run_engine_core(
    config: EngineConfig,
    input_addr: str,
    output_addr: str,
    parent_pid: int,
    num_threads: int | None = None,
) -> None:
    """Entry point of the engine process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the API process's to handle
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s [engine] %(name)s: %(message)s"
        )
    if num_threads:
        torch.set_num_threads(num_threads)
    ctx = zmq.Context(io_threads=1)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.SNDHWM, 0)  # never drop or block on outputs
    out.setsockopt(zmq.LINGER, 2000)  # flush a final EngineError before exiting
    out.connect(output_addr)
    inp = ctx.socket(zmq.PULL)
    inp.setsockopt(zmq.RCVHWM, 0)
    inp.setsockopt(zmq.LINGER, 0)
    inp.bind(input_addr)
    failed = False
    try:
        config = dataclasses.replace(config)  # re-validate (e.g. device "auto") in this process
        core = EngineCore(LLMEngine(config))
        out.send(encode(EngineReady(os.getpid(), core.stats())))
        core.serve(inp, out, parent_pid)
    except BaseException as e:
        failed = True
        logger.exception("Engine process failed")
        out.send(encode(EngineError(f"{type(e).__name__}: {e}", traceback.format_exc())))
    finally:
        inp.close()
        out.close()
        ctx.term()
    # Nothing is left to clean up: skip the interpreter teardown, which takes ~1 s with torch.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failed else 0)


class EngineProcess:
    """The API process's side: the engine process, both sockets and their temp dir.

    ``input`` (PUSH) is connected, so sends queue without blocking even before the engine binds
    (SNDHWM=0: never block, never drop). ``output`` (PULL) is bound; ``async_output`` is its
    zmq.asyncio shadow, created by the client on first use.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="pagedllm-")
        in_addr, out_addr = f"ipc://{self.tmpdir}/input", f"ipc://{self.tmpdir}/output"
        self.ctx = zmq.Context(io_threads=1)
        self.input = self.ctx.socket(zmq.PUSH)
        self.input.setsockopt(zmq.SNDHWM, 0)
        self.input.connect(in_addr)
        self.output = self.ctx.socket(zmq.PULL)
        self.output.setsockopt(zmq.RCVHWM, 0)
        self.output.bind(out_addr)
        self.async_output: zmq.asyncio.Socket | None = None
        self.proc = multiprocessing.get_context("spawn").Process(
            target=run_engine_core,
            args=(config, in_addr, out_addr, os.getpid()),
            kwargs={"num_threads": torch.get_num_threads()},
            name="pagedllm-engine",
            daemon=True,
        )
        self.closed = False

    def start(self) -> EngineReady:
        """Start the process and block until the model is loaded (raise if start-up fails)."""
        try:
            self.proc.start()
            while True:
                if self.output.poll(READY_POLL_MS, zmq.POLLIN):
                    msg = decode(self.output.recv())
                    if isinstance(msg, EngineReady):
                        return msg
                    if isinstance(msg, EngineError):
                        raise RuntimeError(
                            f"The engine failed to start: {msg.message}\n{msg.traceback}"
                        )
                elif not self.proc.is_alive():
                    raise RuntimeError(
                        f"The engine process exited during start-up (code {self.proc.exitcode})."
                    )
        except BaseException:
            self.close()
            raise

    def send(self, msg: Any) -> None:
        self.input.send(encode(msg), zmq.NOBLOCK)

    def close(self) -> None:
        """Ask the engine to stop, terminate/kill it if it does not, free the sockets."""
        if self.closed:
            return
        self.closed = True
        if self.proc.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                self.send(Shutdown())
            self.proc.join(5)
        for stop in (self.proc.terminate, self.proc.kill):
            if self.proc.is_alive():
                stop()
                self.proc.join(2)
        if self.async_output is not None:
            # Unregisters the fd from its event loop, which may be closed already.
            with contextlib.suppress(Exception):
                self.async_output.close(linger=0)
        self.output.close(linger=0)
        self.input.close(linger=0)
        self.ctx.term()
        shutil.rmtree(self.tmpdir, ignore_errors=True)
