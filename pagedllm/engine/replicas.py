"""Data-parallel engine replicas: starting N engine processes and reading them as one.

``pagedllm serve -dp N`` runs N copies of the engine, each in its own process with its own KV
cache, behind one API server; ``AsyncLLM`` routes each request to one of them
(``pagedllm.router``). What is specific to having several lives here:

* devices: on GPUs replica i sees only GPUs ``[i*tp, (i+1)*tp)`` of those visible to the server
  (its ``CUDA_VISIBLE_DEVICES``), so its tensor-parallel ranks are its cuda:0..tp-1; on the CPU
  the replicas share the cores (each gets an equal share of the torch threads);
* start-up: every process is launched before any is waited for, so the models load side by
  side; one failure stops all of them;
* the routing key: the chained block hashes of the tokenized prompt, computed with the prefix
  cache's own ``hash_block``, so "the same prefix" means what it means to the engines;
* stats: one ``EngineStats`` summed over the replicas for the server-wide figures;
* health: the group serves while one replica does (``live_replicas``,
  ``check_replicas_health``), and stops all engines at once (``stop_replicas``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import zmq

from pagedllm.config import EngineConfig
from pagedllm.core.block_pool import hash_block
from pagedllm.engine.engine_monitor import EngineMonitor
from pagedllm.engine.engine_process import EngineProcess
from pagedllm.engine.errors import EngineDeadError, EngineUnresponsiveError
from pagedllm.engine.messages import Shutdown
from pagedllm.engine.stats import EngineStats

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class EngineReplica:
    """One engine process seen from the API process: its handle, the monitor that reads it,
    its last stats and how many requests were sent to it (``index``: its place, 0..N-1)."""

    index: int
    handle: EngineProcess
    stats: EngineStats
    monitor: EngineMonitor = dataclasses.field(init=False)
    num_sent: int = 0

    @property
    def name(self) -> str:
        return f"replica {self.index}"


def replica_devices(config: EngineConfig, dp: int) -> list[dict[str, str]]:
    """Each replica's environment: its ``CUDA_VISIBLE_DEVICES`` on GPUs, nothing on the CPU.
    ValueError when fewer than dp x tp GPUs are visible."""
    if dp == 1 or config.device_config.torch_device.type != "cuda":
        return [{} for _ in range(dp)]
    tp = config.parallel_config.tensor_parallel_size
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        visible = [d.strip() for d in listed.split(",") if d.strip()]
    else:
        visible = [str(i) for i in range(torch.cuda.device_count())]
    if len(visible) < dp * tp:
        raise ValueError(
            f"data_parallel_size={dp} x tensor_parallel_size={tp} needs {dp * tp} GPUs; "
            f"{len(visible)} are visible."
        )
    return [{"CUDA_VISIBLE_DEVICES": ",".join(visible[i * tp : (i + 1) * tp])} for i in range(dp)]


def start_engines(config: EngineConfig, dp: int) -> list[tuple[EngineProcess, EngineStats]]:
    """Launch ``dp`` engine processes, then wait until every one has loaded its model; if one
    fails, all are stopped and the error is raised. Each engine's own config says
    ``data_parallel_size=1``: it is one replica."""
    if dp < 1:
        raise ValueError(f"data_parallel_size must be >= 1, got {dp}.")
    envs = replica_devices(config, dp)
    engine_config = config
    if config.parallel_config.data_parallel_size != 1:
        engine_config = copy.deepcopy(config)
        engine_config.parallel_config.data_parallel_size = 1
    on_cpu = config.device_config.torch_device.type != "cuda"
    threads = max(1, torch.get_num_threads() // dp) if on_cpu else None
    handles: list[EngineProcess] = []
    try:
        for env in envs:
            handles.append(EngineProcess(engine_config, num_threads=threads, env=env))
            handles[-1].launch()
        ready = [h.wait_ready() for h in handles]
    except BaseException:
        for h in handles:
            h.close()
        raise
    for i, (h, r) in enumerate(zip(handles, ready, strict=True)):
        where = h.env.get("CUDA_VISIBLE_DEVICES")
        logger.info(
            "Engine replica %d (pid %d%s) is ready.", i, r.pid, f", GPUs {where}" * bool(where)
        )
    return [(h, r.stats) for h, r in zip(handles, ready, strict=True)]


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> tuple[bytes, ...]:
    """The chained hashes of the prompt's full blocks, as the prefix cache computes them."""
    out: list[bytes] = []
    parent: bytes | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size])
        out.append(parent)
    return tuple(out)


_GAUGES = ("num_running", "num_waiting", "num_unfinished_requests")


def sum_stats(stats: Sequence[EngineStats], alive: Sequence[bool]) -> EngineStats:
    """The replicas' stats as one: counters and pool sizes summed, the gauges of live replicas
    summed, KV-cache usage as the fraction of all blocks in use (a dead replica's last counters
    still count: counters never go down)."""
    if len(stats) == 1:
        return stats[0]
    total: dict[str, float] = {}
    for f in dataclasses.fields(EngineStats):
        if f.name == "kv_cache_usage":
            continue
        total[f.name] = sum(
            getattr(s, f.name)
            for s, up in zip(stats, alive, strict=True)
            if up or f.name not in _GAUGES
        )
    used = sum(s.kv_cache_usage * s.num_kv_blocks for s, up in zip(stats, alive, strict=True) if up)
    blocks = sum(s.num_kv_blocks for s in stats)
    total["kv_cache_usage"] = used / blocks if blocks else 0.0
    return EngineStats(**total)  # type: ignore[arg-type]


def live_replicas(replicas: Sequence[EngineReplica], limit: float | None) -> list[EngineReplica]:
    """Replicas that can take a request: alive, and not silent for more than ``limit`` s
    unless all are. EngineDeadError (the first death) when none is alive."""
    live: list[EngineReplica] = []
    error: EngineDeadError | None = None
    for r in replicas:
        try:
            r.monitor.raise_if_dead()
            live.append(r)
        except EngineDeadError as e:
            error = error or e
    if not live:
        assert error is not None
        raise error
    awake = [r for r in live if limit is None or not r.monitor.is_wedged(limit)]
    return awake or live


def check_replicas_health(replicas: Sequence[EngineReplica], limit: float | None) -> None:
    """Return when one replica is healthy; else raise EngineUnresponsiveError when a live one
    has been silent for more than ``limit`` s, or EngineDeadError."""
    errors: list[Exception] = []
    for r in replicas:
        try:
            r.monitor.check_health(limit)
            return
        except (EngineDeadError, EngineUnresponsiveError) as e:
            errors.append(e)
    unresponsive = [e for e in errors if isinstance(e, EngineUnresponsiveError)]
    raise (unresponsive or errors)[0]


def num_waiting(replicas: Sequence[EngineReplica]) -> int:
    """Requests waiting in the live engines as of their last step, plus those sent to them
    that they have not seen yet."""
    total = 0
    for r in replicas:
        if r.monitor.dead is None:
            unseen = r.num_sent - r.stats.requests_received_total
            total += r.stats.num_waiting + max(unseen, 0)
    return total


def stop_replicas(replicas: Sequence[EngineReplica]) -> None:
    """Stop the readers, then every engine: all get ``Shutdown`` before any is waited for
    (each ``close`` then waits its grace period and SIGKILLs a straggler)."""
    for r in replicas:
        r.monitor.stop()
    for r in replicas:
        if not r.handle.closed and r.handle.proc.is_alive():
            with contextlib.suppress(zmq.ZMQError):
                r.handle.send(Shutdown())
    for r in replicas:
        r.handle.close()
