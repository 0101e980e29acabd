"""The tensor-parallel group of this process: rank, world size and its two collectives.

One module-level :class:`TensorParallelGroup` stands for "the ranks one model is split over".
It starts as a single rank (every collective returns its input unchanged), and
:func:`init_tensor_parallel` replaces it after joining a ``torch.distributed`` process group
(gloo on CPU, NCCL on CUDA). Today the TP group is the whole world; data-parallel replicas
are separate engines, each with its own world, so no sub-groups are needed yet.

``torch.distributed`` is imported only inside the functions that use it, so importing this
package (which every layer does) costs nothing beyond torch itself.
"""

from __future__ import annotations

from typing import Any

import torch

TP_GROUP_NAME = "pagedllm-tp"


class TensorParallelGroup:
    """``world_size`` ranks that hold slices of one model; ``rank`` is this process's.

    ``group`` is the ``torch.distributed`` process group (``None`` for the default one, or for
    a single rank, where no collective runs).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, group: Any = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}.")
        self.rank = rank
        self.world_size = world_size
        self.group = group

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """``tensor`` reduced element-wise over the ranks (in place; returns it).

        ``op``: "sum" (row-parallel partial outputs), "min" or "max" (e.g. the KV-cache
        block count every rank can hold).
        """
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        if op not in ops:
            raise ValueError(f"unknown all-reduce op {op!r} (expected one of {sorted(ops)})")
        dist.all_reduce(tensor, op=ops[op], group=self.group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim`` in rank order (same shapes)."""
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        tensor = tensor.contiguous()
        if tensor.is_cuda:  # one flat buffer: NCCL's fast path
            flat = tensor.new_empty((self.world_size, *tensor.shape))
            dist.all_gather_into_tensor(flat, tensor, group=self.group)
            parts = list(flat.unbind(0))
        else:
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=dim)

    def __repr__(self) -> str:
        return f"TensorParallelGroup(rank={self.rank}, world_size={self.world_size})"


_SINGLE = TensorParallelGroup()
_tp_group: TensorParallelGroup = _SINGLE


def get_tp_group(world_size: int | None = None) -> TensorParallelGroup:
    """This process's tensor-parallel group (a single rank unless initialized).

    A layer passes the ``world_size`` it was built for: a mismatch (a model built for other
    ranks than this process joined) is a ``RuntimeError``, not a silently partial result.
    """
    if world_size is not None and world_size != _tp_group.world_size:
        raise RuntimeError(
            f"a layer built for tensor_parallel_size={world_size} runs in a tensor-parallel "
            f"group of {_tp_group.world_size} rank(s); call init_tensor_parallel before "
            "building the model"
        )
    return _tp_group


def get_tp_rank() -> int:
    """This process's rank in the tensor-parallel group."""
    return _tp_group.rank


def get_tp_size() -> int:
    """The number of ranks the model is split over."""
    return _tp_group.world_size


def init_tensor_parallel(
    rank: int,
    world_size: int,
    init_method: str | None = None,
    backend: str | None = None,
    device: torch.device | str = "cpu",
    store: Any = None,
) -> TensorParallelGroup:
    """Join a ``world_size``-rank process group as ``rank`` and make it the TP group.

    The rendezvous is ``init_method`` (``tcp://127.0.0.1:PORT`` or ``file:///path``) or a
    ``torch.distributed`` ``store`` (the executor's ``TCPStore``, whose port rank 0 picked);
    ``backend`` defaults to NCCL for a CUDA ``device`` (one without an index means
    ``cuda:<rank>``, the ranks of one host), else gloo. One all-reduce runs right away, so the
    communicator exists before any CUDA graph is captured. With ``world_size`` 1 nothing is
    initialized. Call before building the model: layers read their rank and size at
    construction.
    """
    global _tp_group
    if _tp_group.world_size > 1:
        raise RuntimeError(f"tensor parallelism is already initialized ({_tp_group}).")
    if world_size == 1:
        _tp_group = TensorParallelGroup(rank, 1)
        return _tp_group
    import torch.distributed as dist

    device = torch.device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(rank if device.index is None else device.index)
    if (init_method is None) == (store is None):
        raise ValueError("give exactly one of init_method and store")
    # A fixed group name: torch numbers unnamed groups from a per-process counter, which an
    # earlier start-up that failed half way (a rank that died before joining) has advanced on
    # rank 0 only; the ranks would then look for each other under different store keys.
    dist.init_process_group(
        backend,
        init_method=init_method,
        store=store,
        world_size=world_size,
        rank=rank,
        group_name=TP_GROUP_NAME,
    )
    _tp_group = TensorParallelGroup(rank, world_size)
    probe = torch.ones(1, device=torch.cuda.current_device() if device.type == "cuda" else "cpu")
    _tp_group.all_reduce(probe)
    if probe.item() != world_size:
        raise RuntimeError(f"tensor-parallel probe gave {probe.item()}, not {world_size}")
    return _tp_group


def abort_tensor_parallel() -> None:
    """Abort the group's pending collectives (a peer died): a rank blocked in one raises
    instead of waiting forever. Safe from another thread; the group is unusable afterwards."""
    if _tp_group.world_size == 1:
        return
    import torch.distributed as dist
    from torch.distributed import distributed_c10d

    if dist.is_initialized():
        distributed_c10d._abort_process_group()


def destroy_tensor_parallel(timeout_s: float | None = None) -> bool:
    """Leave the process group (if any) and fall back to a single rank.

    Every rank calls it (NCCL tears its communicator down together). With ``timeout_s``, a
    teardown that has not finished by then (a peer that is gone) is abandoned: the group is
    aborted instead and False returned; this rank is a single rank again either way.
    """
    global _tp_group
    done = True
    if _tp_group.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            if timeout_s is None:
                dist.destroy_process_group()
            else:
                import threading

                worker = threading.Thread(target=dist.destroy_process_group, daemon=True)
                worker.start()
                worker.join(timeout_s)
                if worker.is_alive():
                    done = False
                    abort_tensor_parallel()
    _tp_group = _SINGLE
    return done
