"""The engine process: runs ``LLMEngine`` in a loop and talks to ``AsyncLLM`` over zmq.

``EngineProcess`` is the API process's handle: it creates the sockets, starts the process and
waits for it to be ready, and shuts everything down (idempotently).

``run_engine_core`` is the process entry point (started with multiprocessing "spawn"). It binds
a PULL socket for requests, connects a PUSH socket for results, builds the engine, sends
``EngineReady`` and then loops:

1. drain every pending input message without blocking (add requests, aborts, shutdown);
2. if the engine has work, run one ``step()`` and send ONE ``EngineOutputs`` with all of that
   step's outputs and the current stats;
3. when idle, send a ``Heartbeat`` every ``HEARTBEAT_INTERVAL_S`` (at once, with the stats, if
   they changed) and block in ``poll`` until the next one is due (no spinning). Silence from
   the engine therefore always means it is stopped or stuck, never that it has nothing to do.
   A busy engine sends no heartbeats: its per-step outputs are the sign of life.

The loop also ends when the parent process is gone. A request the engine rejects comes back as
a ``RequestError`` for that request alone. Any exception in ``step()`` is fatal: an
``EngineError`` with the traceback is sent and the process exits with code 1.

Signals: the engine ignores SIGINT and SIGTERM. Both go to the whole process group (Ctrl-C,
systemd's KillMode=control-group), and stopping is the API process's call: it drains in-flight
requests first, then sends ``Shutdown``, and SIGKILLs an engine that has not exited after a
grace period (``EngineProcess.close``).

Sockets: on Linux they live in the abstract namespace (``ipc://@pagedllm-<pid>-<random>-...``),
so nothing is left on disk even when the API process is killed with SIGKILL. Elsewhere they are
files in a private temp dir ``pagedllm-<pid>-*``; dirs left by dead API processes are removed at
the next start. Frames are signed (see ``messages``): abstract sockets have no permissions.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import math
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
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
    BadMessageError,
    EngineError,
    EngineOutputs,
    EngineReady,
    Heartbeat,
    RequestError,
    Shutdown,
    decode,
    encode,
    new_key,
)

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.5  # an idle engine says so this often (and checks its parent)
READY_POLL_MS = 200  # how often the API process checks the engine while it starts
SHUTDOWN_GRACE_S = 5.0  # after Shutdown, how long the engine may take before it is SIGKILLed
KILL_WAIT_S = 2.0
FINISH_REASONS = ("stop", "length", "abort")
_STALE_DIR_RE = re.compile(r"pagedllm-(\d+)-")


class Channel:
    """One zmq socket with signed frames: ``send`` signs, ``messages`` drops forged frames."""

    def __init__(self, sock: zmq.Socket, key: bytes, send_flags: int = 0) -> None:
        self.sock = sock
        self.key = key
        self.send_flags = send_flags
        self.num_rejected = 0

    def send(self, msg: Any) -> None:
        self.sock.send(encode(msg, self.key), self.send_flags)

    def messages(self) -> Iterator[Any]:
        """Every message available now, without blocking."""
        while True:
            try:
                data = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                yield decode(data, self.key)
            except BadMessageError as e:
                self.num_rejected += 1
                if self.num_rejected in (1, 10) or self.num_rejected % 1000 == 0:
                    logger.warning("%s (%d so far)", e, self.num_rejected)


class EngineCore:
    """Wraps an ``LLMEngine``: applies input messages, steps, and keeps cumulative counters.
    Everything it sends goes through ``out``."""

    def __init__(self, engine: LLMEngine, out: Channel) -> None:
        self.engine = engine
        self.out = out
        self._live: dict[str, list[Request]] = {}  # request id -> its n sequences
        self._prompt_counted: set[str] = set()
        self._finished_generation_tokens = 0
        self._last_sent = time.monotonic()
        self._last_stats: dict[str, float] | None = None  # as last sent
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

    # ---- output ----------------------------------------------------------------------------
    def send(self, msg: Any) -> None:
        self.out.send(msg)
        self._last_sent = time.monotonic()
        stats = getattr(msg, "stats", None)
        if stats is not None:
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
        elif isinstance(msg, Shutdown):
            return False
        else:
            logger.warning("Engine process ignored an unknown message: %r", type(msg).__name__)
        return True

    def serve(self, inp: Channel, parent_pid: int) -> None:
        """Run until ``Shutdown`` arrives or the parent process is gone."""
        while os.getppid() == parent_pid:
            busy = self.engine.has_unfinished_requests()
            if inp.sock.poll(0 if busy else self._ms_to_heartbeat(), zmq.POLLIN):
                for msg in inp.messages():
                    if not self.handle(msg):
                        return
            if self.engine.has_unfinished_requests():
                self.send(self.step())
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
    """Entry point of the engine process."""
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
    inp.bind(input_addr)
    failed = False
    try:
        config = dataclasses.replace(config)  # re-validate (e.g. device "auto") in this process
        core = EngineCore(LLMEngine(config), out)
        core.send(EngineReady(os.getpid(), core.stats()))
        core.serve(Channel(inp, key), parent_pid)
    except BaseException as e:
        failed = True
        logger.exception("Engine process failed")
        out.send(EngineError(f"{type(e).__name__}: {e}", traceback.format_exc()))
    finally:
        inp.close()
        out_sock.close()
        ctx.term()
    # Nothing is left to clean up: skip the interpreter teardown, which takes ~1 s with torch.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if failed else 0)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


def remove_stale_dirs(root: str | None = None) -> None:
    """Remove our ``pagedllm-<pid>-*`` socket dirs whose API process is gone (it was killed
    before it could clean up). Only used where abstract sockets are not available."""
    root = root or tempfile.gettempdir()
    with contextlib.suppress(OSError), os.scandir(root) as entries:
        for entry in entries:
            m = _STALE_DIR_RE.match(entry.name)
            if m is None or not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat().st_uid == os.getuid() and not _pid_alive(int(m[1])):
                shutil.rmtree(entry.path, ignore_errors=True)


class EngineProcess:
    """The API process's side: the engine process and both sockets.

    ``input`` (PUSH) is connected, so sends queue without blocking even before the engine binds
    (SNDHWM=0: never block, never drop). ``output`` (PULL) is bound; ``async_output`` is its
    zmq.asyncio shadow, created by the client on first use (for ``poll``; read with
    ``messages()``). ``tmpdir`` is None with abstract sockets.
    """

    def __init__(self, config: EngineConfig, *, abstract: bool | None = None) -> None:
        self.key = new_key()
        self.ctx = zmq.Context(io_threads=1)
        self.output = self.ctx.socket(zmq.PULL)
        self.output.setsockopt(zmq.RCVHWM, 0)
        self.tmpdir: str | None = None
        if abstract is None:
            abstract = sys.platform.startswith("linux")
        self.input_addr, self.output_addr = self._bind_output(abstract)
        self.input = self.ctx.socket(zmq.PUSH)
        self.input.setsockopt(zmq.SNDHWM, 0)
        self.input.connect(self.input_addr)
        self._in = Channel(self.input, self.key, zmq.NOBLOCK)
        self._out = Channel(self.output, self.key)
        self.async_output: zmq.asyncio.Socket | None = None
        self.shutdown_grace_s = SHUTDOWN_GRACE_S
        self.proc = multiprocessing.get_context("spawn").Process(
            target=run_engine_core,
            args=(config, self.input_addr, self.output_addr, os.getpid(), self.key),
            kwargs={"num_threads": torch.get_num_threads()},
            name="pagedllm-engine",
            daemon=True,
        )
        self.closed = False

    def _bind_output(self, abstract: bool) -> tuple[str, str]:
        """Bind ``output``; return both addresses (abstract namespace, else a temp dir)."""
        if abstract:
            base = f"ipc://@pagedllm-{os.getpid()}-{secrets.token_hex(8)}"
            try:
                self.output.bind(f"{base}-output")
                return f"{base}-input", f"{base}-output"
            except zmq.ZMQError as e:
                logger.warning("Abstract ipc sockets are not available (%s); using a temp dir.", e)
        remove_stale_dirs()
        self.tmpdir = tempfile.mkdtemp(prefix=f"pagedllm-{os.getpid()}-")
        self.output.bind(f"ipc://{self.tmpdir}/output")
        return f"ipc://{self.tmpdir}/input", f"ipc://{self.tmpdir}/output"

    def start(self) -> EngineReady:
        """Start the process and block until the model is loaded (raise if start-up fails)."""
        try:
            self.proc.start()
            # After multiprocessing's own exit hook, so this one runs first (atexit is LIFO):
            # that hook would SIGTERM the engine (ignored) and then wait for it forever.
            atexit.register(self.close)
            while True:
                if self.output.poll(READY_POLL_MS, zmq.POLLIN):
                    for msg in self.messages():
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
        self._in.send(msg)

    def messages(self) -> Iterator[Any]:
        """The engine's messages available now (forged frames are dropped)."""
        return self._out.messages()

    def kill(self) -> None:
        """SIGKILL the engine now (it is stuck); ``close()`` still has to be called."""
        if self.proc.is_alive():
            self.proc.kill()

    def close(self) -> None:
        """Stop the engine process, free the sockets (idempotent)."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        self._stop_process()
        if self.async_output is not None:
            # Unregisters the fd from its event loop, which may be closed already.
            with contextlib.suppress(Exception):
                self.async_output.close(linger=0)
        self.output.close(linger=0)
        self.input.close(linger=0)
        self.ctx.term()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _stop_process(self) -> None:
        """``Shutdown``, then SIGKILL once ``shutdown_grace_s`` is up. Never SIGTERM: the
        engine ignores it."""
        if self.proc.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                self.send(Shutdown())
            self.proc.join(self.shutdown_grace_s)
        if self.proc.is_alive():
            logger.warning(
                "The engine process %d did not exit within %g s of Shutdown; killing it.",
                self.proc.pid,
                self.shutdown_grace_s,
            )
            self.proc.kill()
            self.proc.join(KILL_WAIT_S)
