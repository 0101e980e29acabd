"""Tensor parallelism on one host: rank 0 in the engine's process, ranks 1..N-1 in workers.

Rank 0 keeps everything the engine has today (scheduler, async scheduling, the output path)
and its own ``ModelRunner`` over its slices; each call is first broadcast to the workers as
one signed, pickled frame of plain data (``SchedulerOutput`` and the grammar bitmask), then
run locally, so all ranks enqueue the same forward pass and meet in the same collectives
(gloo on CPU, NCCL on GPUs, captured in the CUDA graphs). Sampling runs on every rank with
the same generator states, so every rank holds the same sampled ids on its device for the next
step's inputs and nothing is sent back per step.

Failures are named, never hung on: a worker that fails to start reports its traceback; one
that dies later is seen by a monitor thread watching the process sentinels, which aborts the
process group so a rank blocked in a collective raises; the engine then gets a RuntimeError
naming the rank. ``shutdown`` (also at interpreter exit) stops every worker; workers also die
with their parent.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import zmq

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.distributed import (
    abort_tensor_parallel,
    destroy_tensor_parallel,
    init_tensor_parallel,
)
from pagedllm.engine.framing import BadMessageError, decode, encode, new_key
from pagedllm.executor.base import Executor, register_executor
from pagedllm.executor.worker_proc import (
    CHECK_SAMPLES_ENV,
    JOIN_TIMEOUT,
    WorkerArgs,
    run_worker,
)
from pagedllm.worker.model_runner import ForwardOutput, ModelRunner
from pagedllm.worker.step_output import StepHandle

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # joining the group; model loading has no limit of ours
SHUTDOWN_TIMEOUT_S = 10.0  # leaving the group, then the workers' exit


@contextlib.contextmanager
def _allow_children() -> Iterator[None]:
    """Let a daemonic process (the serving engine's) start the workers: multiprocessing
    refuses children of daemons because it could not clean them up at exit; here shutdown
    does, and each worker exits by itself when its parent is gone."""
    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    daemon = config.pop("daemon", None)
    try:
        yield
    finally:
        if daemon is not None:
            config["daemon"] = daemon


class _Health:
    """What the monitor thread found (no reference to the executor, so it can be freed)."""

    def __init__(self) -> None:
        self.failure: str | None = None
        self.closing = False


def _watch(procs: list[Any], stop_fd: int, health: _Health, abort: bool) -> None:
    sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(procs, start=1)}
    ready = multiprocessing.connection.wait([*sentinels, stop_fd])
    if health.closing or stop_fd in ready:
        return
    rank, proc = sentinels[next(s for s in ready if s in sentinels)]
    proc.join(1.0)
    health.failure = (
        f"tensor-parallel worker rank {rank} (pid {proc.pid}) exited unexpectedly "
        f"(exit code {proc.exitcode})"
    )
    logger.error("%s; the engine stops.", health.failure)
    if abort:  # wake rank 0 if it waits in a collective that rank can no longer join
        try:
            abort_tensor_parallel()
        except Exception:  # noqa: BLE001 - best effort; the failure is already recorded
            logger.exception("aborting the tensor-parallel group failed")


class _CheckedHandle(StepHandle):
    """Test mode: rank 0's results, compared with every worker's sampled tokens."""

    def __init__(self, inner: StepHandle, executor: MultiprocExecutor, call_no: int) -> None:
        self.inner, self.executor, self.call_no = inner, executor, call_no

    def get(self) -> ModelRunnerOutput:
        out = self.inner.get()
        for rank, sampled in self.executor._worker_samples(self.call_no).items():
            if sampled != out.sampled:
                raise RuntimeError(
                    f"tensor-parallel rank {rank} sampled {sampled} where rank 0 sampled "
                    f"{out.sampled} (call {self.call_no})"
                )
        return out


@register_executor("mp")
class MultiprocExecutor(Executor):
    """Rank 0 here, ranks 1..N-1 in spawned worker processes of this host."""

    def __init__(self, config: EngineConfig) -> None:
        self.world_size = tp = config.parallel_config.tensor_parallel_size
        self.check_samples = os.environ.get(CHECK_SAMPLES_ENV) == "1"
        self.health = _Health()
        self._closed = False
        self._calls = 0
        self._samples: dict[int, dict[int, dict[str, list[int]]]] = {}
        self._errors: dict[int, str] = {}
        self.ctx = zmq.Context(io_threads=1)
        self.key = new_key()
        self._tmpdir: str | None = None
        base = self._socket_base()
        self._socks = []
        for rank in range(1, tp):
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(f"{base}-step{rank}")
            self._socks.append(sock)
        self._replies = self.ctx.socket(zmq.PULL)
        self._replies.setsockopt(zmq.LINGER, 0)
        self._replies.bind(f"{base}-reply")
        import torch.distributed as dist

        store = dist.TCPStore(
            "127.0.0.1", 0, tp, is_master=True, wait_for_workers=False, timeout=JOIN_TIMEOUT
        )
        seed = secrets.randbits(63)
        kwargs = config.to_kwargs()
        kwargs["device"] = config.device_config.torch_device.type  # as rank 0 resolved it
        spawn = multiprocessing.get_context("spawn")
        self.procs = [
            spawn.Process(
                target=run_worker,
                args=(
                    WorkerArgs(
                        rank, tp, kwargs, store.port, f"{base}-step{rank}", f"{base}-reply",
                        self.key, seed, self.check_samples,
                    ),
                    os.getpid(),
                ),
                name=f"pagedllm-tp-rank{rank}",
                daemon=True,
            )
            for rank in range(1, tp)
        ]  # fmt: skip
        with _allow_children():
            for proc in self.procs:
                proc.start()
        self._stop_r, self._stop_w = os.pipe()
        device = config.device_config.torch_device
        self._monitor = threading.Thread(
            target=_watch,
            args=(self.procs, self._stop_r, self.health, device.type == "cuda"),
            name="pagedllm-tp-monitor",
            daemon=True,
        )
        self._monitor.start()
        atexit.register(self.shutdown)
        try:
            self._join_group(store, device)
            self.runner = ModelRunner(config)
            torch.manual_seed(seed)
            self._wait_ready()
        except BaseException as e:
            failure = self._failure(wait_s=5.0)
            self.shutdown()
            if failure is not None:
                raise RuntimeError(failure) from e
            raise
        self.num_blocks = self.runner.num_blocks
        self.vocab_size = self.runner.vocab_size
        logger.info("Tensor parallelism: %d ranks (%s).", tp, device)

    # ---- start-up ----------------------------------------------------------------------
    def _socket_base(self) -> str:
        name = f"pagedllm-tp-{os.getpid()}-{secrets.token_hex(6)}"
        if sys.platform.startswith("linux"):
            return f"ipc://@{name}"  # abstract namespace: nothing to clean up
        self._tmpdir = tempfile.mkdtemp(prefix="pagedllm-tp-")
        return f"ipc://{self._tmpdir}/{name}"

    def _join_group(self, store: Any, device: torch.device) -> None:
        """Join the process group once every worker has said it is joining too: a worker
        that dies before that is reported instead of waited for (and no rendezvous is left
        half done in this process, which would confuse the next one). A worker that dies
        in the moment between is caught by the store's timeout."""
        joining: set[int] = set()
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(joining) < self.world_size - 1:
            for msg in self._drain_replies(timeout_ms=20):
                if msg[0] == "joining":
                    joining.add(msg[1])
            if self._errors or self.health.failure:
                raise RuntimeError("a tensor-parallel worker failed to start")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"tensor-parallel ranks did not join within {START_TIMEOUT_S:.0f} s"
                )
        init_tensor_parallel(0, self.world_size, device=device, store=store)

    def _wait_ready(self) -> None:
        ready: dict[int, int] = {}
        while len(ready) < self.world_size - 1:
            for msg in self._drain_replies(timeout_ms=50):
                if msg[0] == "ready":
                    ready[msg[1]] = msg[2]
            if self._errors or self.health.failure:
                raise RuntimeError("a tensor-parallel worker failed to start")
        for rank, blocks in ready.items():
            if blocks != self.runner.num_blocks:
                raise RuntimeError(
                    f"tensor-parallel rank {rank} holds {blocks} KV blocks, rank 0 "
                    f"{self.runner.num_blocks}: the pools must agree"
                )

    # ---- replies and failures ------------------------------------------------------------
    def _drain_replies(self, timeout_ms: int = 0) -> list[tuple[Any, ...]]:
        msgs: list[tuple[Any, ...]] = []
        if not self._replies.poll(timeout_ms, zmq.POLLIN):
            return msgs
        while True:
            try:
                data = self._replies.recv(zmq.NOBLOCK)
            except zmq.Again:
                return msgs
            try:
                msg = decode(data, self.key)
            except BadMessageError as e:
                logger.warning("%s", e)
                continue
            if msg[0] == "error":
                self._errors[msg[1]] = msg[2]
                logger.error("tensor-parallel worker rank %d failed:\n%s", msg[1], msg[2])
            elif msg[0] == "sampled":
                self._samples.setdefault(msg[2], {})[msg[1]] = msg[3]
            else:
                msgs.append(msg)

    def _failure(self, wait_s: float = 0.0) -> str | None:
        """A description of the first worker failure (waiting up to ``wait_s`` for one to be
        reported), or None."""
        deadline = time.monotonic() + wait_s
        while True:
            self._drain_replies()
            if self._errors:
                rank = min(self._errors)
                last = self._errors[rank].strip().splitlines()[-1]
                return f"tensor-parallel worker rank {rank} failed: {last}"
            if self.health.failure is not None:
                return self.health.failure
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def check_health(self) -> None:
        if self.health.failure is not None or self._closed:
            raise RuntimeError(self._failure() or "the tensor-parallel executor is shut down")

    def _worker_samples(self, call_no: int) -> dict[int, dict[str, list[int]]]:
        while len(self._samples.get(call_no, {})) < self.world_size - 1:
            self._drain_replies(timeout_ms=50)
            self.check_health()
        return self._samples.pop(call_no)

    # ---- steps -------------------------------------------------------------------------
    def _broadcast(self, *msg: Any) -> int:
        self.check_health()
        self._calls += 1
        frame = encode((msg[0], self._calls, *msg[1:]), self.key)
        for sock in self._socks:
            sock.send(frame, copy=False)
        return self._calls

    def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:
            failure = self._failure(wait_s=2.0)
            if failure is not None:
                raise RuntimeError(failure) from e
            raise

    def _checked(self, handle: StepHandle, call_no: int) -> StepHandle:
        return _CheckedHandle(handle, self, call_no) if self.check_samples else handle

    def execute_model(self, step: SchedulerOutput) -> ForwardOutput:
        self._broadcast("model", step)
        out: ForwardOutput = self._run(self.runner.execute_model, step)
        return out

    def sample_tokens(
        self,
        fwd: ForwardOutput,
        structured_seq_ids: list[str] | None = None,
        grammar_bitmask: np.ndarray | None = None,
    ) -> StepHandle:
        call_no = self._broadcast("sample", structured_seq_ids, grammar_bitmask)
        handle = self._run(self.runner.sample_tokens, fwd, structured_seq_ids, grammar_bitmask)
        return self._checked(handle, call_no)

    def execute_async(self, step: SchedulerOutput) -> StepHandle:
        call_no = self._broadcast("step", step)
        return self._checked(self._run(self.runner.execute_async, step), call_no)

    # ---- shutdown ----------------------------------------------------------------------
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.health.closing = True
        atexit.unregister(self.shutdown)
        frame = encode(("shutdown",), self.key)
        for sock in self._socks:
            with contextlib.suppress(zmq.ZMQError):
                sock.send(frame, zmq.NOBLOCK)
        try:  # together with the workers, which leave the group on "shutdown"
            if not destroy_tensor_parallel(timeout_s=SHUTDOWN_TIMEOUT_S):
                logger.warning("the tensor-parallel group did not close in time; aborted it")
        except Exception:  # noqa: BLE001 - an aborted group may refuse a clean exit
            logger.warning("leaving the tensor-parallel group failed", exc_info=True)
        deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        os.write(self._stop_w, b"x")
        self._monitor.join(2.0)
        os.close(self._stop_r)
        os.close(self._stop_w)
        for sock in [*self._socks, self._replies]:
            sock.close(0)
        self.ctx.term()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
