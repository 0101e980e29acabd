"""Host-to-device copies that never stall the stream, and a CUDA-graph kernel timer.

A copy from pageable host memory makes CUDA wait for all work queued before it, which would
serialize the CPU's preparation of step N+1 behind the GPU's step N. Staging through pinned
memory (PyTorch's caching host allocator) keeps the copy asynchronous.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch


def h2d(values: Sequence[Any] | np.ndarray | torch.Tensor, dtype: torch.dtype,
        device: torch.device) -> torch.Tensor:  # fmt: skip
    """``values`` as a tensor on ``device``, copied asynchronously when it is a GPU."""
    if isinstance(values, torch.Tensor):
        t = values.to(dtype)
    elif isinstance(values, np.ndarray):
        t = torch.from_numpy(values).to(dtype)
    else:
        t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def h2d_packed(arrays: Sequence[np.ndarray], dtype: torch.dtype,
               device: torch.device) -> list[torch.Tensor]:  # fmt: skip
    """Several host arrays on ``device`` through one copy: packed into one buffer, sent, and
    handed back as views of the right shapes (each copy costs a pinned staging buffer and a
    launch, which add up when a step has half a dozen small inputs)."""
    flat = np.concatenate([a.ravel() for a in arrays])
    packed = h2d(flat, dtype, device)
    out, pos = [], 0
    for a in arrays:
        out.append(packed[pos : pos + a.size].view(a.shape))
        pos += a.size
    return out


def cuda_graph_time_us(fn: Callable[[], Any], reps: int = 10, replays: int = 3) -> float:
    """GPU time of one ``fn()`` call in µs: ``reps`` calls captured in one CUDA graph, replayed
    ``replays`` times (no Python launch overhead, as inside the engine's decode graphs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles, allocator) outside the capture
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * reps)
