"""Process groups for tensor parallelism: who this rank is, and the collectives layers need.

Sharded layers (``layers/linear.py``, ``layers/embedding.py``) read ``get_tp_rank()`` /
``get_tp_size()`` once, at construction, to size and cut their weights, and call
``get_tp_group().all_reduce`` / ``.all_gather`` in ``forward``. Until a worker calls
:func:`init_tensor_parallel` the group is a single rank whose collectives return their input,
so TP=1 code pays nothing and needs no ``torch.distributed`` set-up.
"""

from __future__ import annotations

from pagedllm.distributed.parallel_state import (
    TensorParallelGroup,
    abort_tensor_parallel,
    destroy_tensor_parallel,
    get_tp_group,
    get_tp_rank,
    get_tp_size,
    init_tensor_parallel,
)

__all__ = [
    "TensorParallelGroup",
    "abort_tensor_parallel",
    "destroy_tensor_parallel",
    "get_tp_group",
    "get_tp_rank",
    "get_tp_size",
    "init_tensor_parallel",
]
