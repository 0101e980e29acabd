"""``EngineProcess``: the API process's handle on the engine process (``core_proc``).

Everything about the engine as an OS process lives here, so that ``AsyncLLM`` deals in
messages only: where the sockets are, spawning the process and waiting until its model is
loaded, sending to it, and stopping it in a way that cannot hang.

Sockets: on Linux they live in the abstract namespace (``ipc://@pagedllm-<pid>-<random>-...``),
so nothing is left on disk even when the API process is killed with SIGKILL. Elsewhere they are
files in a private temp dir ``pagedllm-<pid>-*``; dirs left by dead API processes are removed at
the next start (``remove_stale_dirs``). Either way every frame is signed (see ``framing``).

Stopping: ``close()`` sends ``Shutdown``, waits ``shutdown_grace_s`` and then SIGKILLs. Never
SIGTERM: the engine ignores it. ``close`` is also an atexit hook, registered after
multiprocessing's own so that it runs first: that one would SIGTERM the (daemonic) engine and
then wait for it forever.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
import zmq
import zmq.asyncio

from pagedllm.config import EngineConfig
from pagedllm.engine.core_proc import run_engine_core
from pagedllm.engine.framing import Channel, new_key
from pagedllm.engine.messages import EngineError, EngineReady, Shutdown

logger = logging.getLogger(__name__)

READY_POLL_MS = 200  # how often the API process checks the engine while it starts
SHUTDOWN_GRACE_S = 5.0  # after Shutdown, how long the engine may take before it is SIGKILLed
KILL_WAIT_S = 2.0
_STALE_DIR_RE = re.compile(r"pagedllm-(\d+)-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``env`` set, restored afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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
    """The engine process and the two sockets to it, seen from the API process.

    ``send`` writes to ``input`` (PUSH, connected: sends queue without blocking even before the
    engine binds; SNDHWM=0: never block, never drop). The engine's messages arrive on ``output``
    (PULL, bound here): ``messages()`` returns those available now and ``wait_readable()``
    awaits more on the running event loop. ``tmpdir`` is None with abstract sockets.

    Life cycle: the constructor binds; ``start()`` spawns the process and blocks until the model
    is loaded (``launch()`` + ``wait_ready()``: data-parallel replicas load side by side);
    ``close()`` (idempotent, also run at exit) stops the process and frees the rest.
    ``env``: variables for the process (a replica's ``CUDA_VISIBLE_DEVICES``); ``num_threads``:
    its torch threads (default: this process's count).
    """

    def __init__(
        self,
        config: EngineConfig,
        *,
        abstract: bool | None = None,
        num_threads: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.key = new_key()
        self.ctx = zmq.Context(io_threads=1)
        self.output = self.ctx.socket(zmq.PULL)
        self.output.setsockopt(zmq.RCVHWM, 0)
        self.input = self.ctx.socket(zmq.PUSH)
        self.input.setsockopt(zmq.SNDHWM, 0)
        self.tmpdir: str | None = None
        self.closed = False
        self._async_output: zmq.asyncio.Socket | None = None  # created by wait_readable()
        try:
            if abstract is None:
                abstract = sys.platform.startswith("linux")
            self.input_addr, self.output_addr = self._bind_output(abstract)
            self.input.connect(self.input_addr)
        except BaseException:
            self._free_sockets()
            raise
        self._in = Channel(self.input, self.key, zmq.NOBLOCK)
        self._out = Channel(self.output, self.key)
        self.shutdown_grace_s = SHUTDOWN_GRACE_S
        self.env = dict(env or {})  # set in the process's environment (spawn copies it)
        self.proc = multiprocessing.get_context("spawn").Process(
            target=run_engine_core,
            args=(config, self.input_addr, self.output_addr, os.getpid(), self.key),
            kwargs={"num_threads": num_threads or torch.get_num_threads()},
            name="pagedllm-engine",
            daemon=True,
        )

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
        self.launch()
        return self.wait_ready()

    def launch(self) -> None:
        """Spawn the process without waiting for it (several engines then load side by side;
        ``wait_ready`` waits). ``env`` is set for the spawn only: the child inherits it."""
        try:
            with _environment(self.env):
                self.proc.start()
            atexit.register(self.close)  # after multiprocessing's hook: runs before it (LIFO)
        except BaseException:
            self.close()
            raise

    def wait_ready(self) -> EngineReady:
        """Block until the launched process has loaded the model (raise if start-up fails)."""
        try:
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
        """Queue ``msg`` for the engine; never blocks. Raises zmq.ZMQError once closed."""
        self._in.send(msg)

    def messages(self) -> Iterator[Any]:
        """The engine's messages available now (forged frames are dropped)."""
        return self._out.messages()

    async def wait_readable(self, timeout_ms: int) -> bool:
        """Wait on the running event loop until a message can be read, at most ``timeout_ms``;
        False if none came. Raises zmq.ZMQError once closed."""
        if self._async_output is None:
            self._async_output = zmq.asyncio.Socket.from_socket(self.output)
        return bool(await self._async_output.poll(timeout_ms, zmq.POLLIN))

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
        self._free_sockets()

    def _stop_process(self) -> None:
        """``Shutdown``, then SIGKILL once ``shutdown_grace_s`` is up."""
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

    def _free_sockets(self) -> None:
        if self._async_output is not None:
            # Unregisters the fd from its event loop, which may be closed already.
            with contextlib.suppress(Exception):
                self._async_output.close(linger=0)
        self.output.close(linger=0)
        self.input.close(linger=0)
        self.ctx.term()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
