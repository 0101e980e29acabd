"""A tensor-parallel worker process: rank r of N, driven by rank 0 through plain-data steps.

Started by ``MultiprocExecutor`` (spawn). It joins the process group, builds its own
``ModelRunner`` (its slices of the weights, its KV pool), seeds torch exactly as rank 0 does,
reports ``ready`` and then replays every call rank 0 makes on its runner, in order: the same
forward pass over its shard, the same collectives, and the same sampling (identical logits,
identical generator states, hence identical tokens, which the next step's inputs read from the
device). It never sends results back, except in the check mode used by tests
(``PAGEDLLM_TP_CHECK_SAMPLES=1``), where it reports its sampled tokens for comparison.

It exits on a ``shutdown`` message, when its parent process dies (a thread watches the parent
pid; the step loop also watches the parent's sentinel), or when a collective fails because a
peer died.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import zmq

from pagedllm.engine.framing import decode, encode

logger = logging.getLogger(__name__)

CHECK_SAMPLES_ENV = "PAGEDLLM_TP_CHECK_SAMPLES"
PARENT_POLL_S = 0.5
JOIN_TIMEOUT = timedelta(seconds=120)  # the rendezvous store's, as rank 0 sets it


@dataclass
class WorkerArgs:
    """What a worker needs to start: all plain data (it crosses the spawn pipe)."""

    rank: int
    world_size: int
    config_kwargs: dict[str, Any]
    store_port: int
    step_addr: str
    reply_addr: str
    key: bytes
    seed: int
    check_samples: bool


def _die_with_parent(parent_pid: int) -> None:
    """Exit as soon as the parent process is gone, even while the main thread is blocked in
    a collective or a device sync (a thread polls; ``PR_SET_PDEATHSIG`` would also fire when
    merely the parent's *thread* that started us ends)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="pagedllm-parent-watch", daemon=True).start()


def run_worker(args: WorkerArgs, parent_pid: int) -> None:
    """The worker process's entry point (``multiprocessing`` spawn target)."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches rank 0, which stops us
    ctx = zmq.Context(io_threads=1)
    steps = ctx.socket(zmq.PULL)
    steps.setsockopt(zmq.RCVHWM, 0)
    steps.connect(args.step_addr)
    replies = ctx.socket(zmq.PUSH)
    replies.setsockopt(zmq.LINGER, 2000)
    replies.connect(args.reply_addr)

    def reply(msg: Any) -> None:
        replies.send(encode(msg, args.key))

    try:
        runner = _start(args, reply)
        reply(("ready", args.rank, runner.num_blocks))
        if _serve(runner, steps, reply, args):  # rank 0 said "shutdown": leave together
            from pagedllm.distributed import destroy_tensor_parallel

            destroy_tensor_parallel(timeout_s=10.0)
    except BaseException:  # reported to rank 0 (it names the rank and the cause), then exit
        reply(("error", args.rank, traceback.format_exc()))
        replies.close()
        ctx.term()
        os._exit(1)
    replies.close()
    steps.close()
    ctx.term()


def _start(args: WorkerArgs, reply: Any) -> Any:
    import torch
    import torch.distributed as dist

    from pagedllm.config import EngineConfig
    from pagedllm.distributed import init_tensor_parallel
    from pagedllm.worker.model_runner import ModelRunner

    config = EngineConfig(**args.config_kwargs)
    device = config.device_config.torch_device
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))
    store = dist.TCPStore(
        "127.0.0.1", args.store_port, args.world_size, is_master=False, timeout=JOIN_TIMEOUT
    )
    reply(("joining", args.rank))  # rank 0 joins only once every rank has said this
    init_tensor_parallel(args.rank, args.world_size, device=device, store=store)
    runner = ModelRunner(config)
    torch.manual_seed(args.seed)
    return runner


def _serve(runner: Any, steps: zmq.Socket, reply: Any, args: WorkerArgs) -> bool:
    """Replay rank 0's calls; True at ``shutdown``, False when the parent is gone."""
    poller = zmq.Poller()
    poller.register(steps, zmq.POLLIN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        poller.register(parent.sentinel, zmq.POLLIN)
    forward = None
    pending = None  # the last step's handle, not yet waited for
    while True:
        ready = dict(poller.poll())
        if steps not in ready:  # only the parent's sentinel: it is gone
            return False
        msg = decode(steps.recv(), args.key)
        kind = msg[0]
        if kind == "shutdown":
            return True
        handle = None
        if kind == "model":
            forward = runner.execute_model(msg[2])
        elif kind == "sample":
            handle = runner.sample_tokens(forward, msg[2], msg[3])
            forward = None
        elif kind == "step":
            handle = runner.execute_async(msg[2])
        else:
            raise ValueError(f"unknown message {kind!r} from rank 0")
        if handle is None:
            continue
        if args.check_samples:  # rank 0 waits for these: answer now
            reply(("sampled", args.rank, msg[1], handle.get().sampled))
            continue
        # Wait for the previous step only now that this one is enqueued (as rank 0 does), so
        # the host never runs more than a step ahead of this rank's device.
        if pending is not None:
            pending.get()
        pending = handle
