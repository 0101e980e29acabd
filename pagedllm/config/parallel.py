"""`ParallelConfig`: how many devices one engine spreads over, and who drives them.

Tensor parallelism splits one model over ``tensor_parallel_size`` ranks: rank 0 stays in the
engine's process, ranks 1..N-1 are worker processes started by the executor
(``pagedllm/executor/``). Data-parallel replicas are separate engine processes that only
``pagedllm serve`` starts (it takes ``data_parallel_size`` out before building each engine's
config), so an engine config with ``data_parallel_size`` other than 1 is refused rather than
silently run as one replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.config.utils import check_at_least, check_choice, config_error

EXECUTOR_BACKENDS = ("uni", "mp")


@dataclass
class ParallelConfig:
    """Parallelism: tensor- and data-parallel sizes and the executor that runs the ranks."""

    tensor_parallel_size: int = field(
        default=1,
        metadata={
            "help": "devices one model is split over (tensor parallelism); on GPUs, rank r "
            "uses cuda:r of the visible devices",
            "aliases": ["-tp"],
        },
    )
    data_parallel_size: int = field(
        default=1,
        metadata={
            "help": "engine replicas behind one server (pagedllm serve only: one engine "
            "process each, on its own GPUs, routed by --router-policy)",
            "aliases": ["-dp"],
        },
    )
    distributed_executor_backend: str | None = field(
        default=None,
        metadata={
            "help": "how tensor-parallel ranks run: uni (one rank, in the engine's process) "
            "or mp (ranks 1..N-1 in worker processes on this host)",
            "default_help": "uni for one rank, mp for more",
            "choices": EXECUTOR_BACKENDS,
        },
    )

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "data_parallel_size"):
            check_at_least(self, name, 1)
        if self.data_parallel_size != 1:
            raise config_error(
                f"data_parallel_size={self.data_parallel_size}: data parallelism is a "
                "pagedllm serve option (-dp N engine processes behind one server); LLM, "
                "generate and bench run one engine."
            )
        if self.distributed_executor_backend is None:
            self.distributed_executor_backend = "uni" if self.tensor_parallel_size == 1 else "mp"
        check_choice(self, "distributed_executor_backend")
        if self.distributed_executor_backend == "uni" and self.tensor_parallel_size > 1:
            raise config_error(
                f"distributed_executor_backend='uni' runs one rank, but tensor_parallel_size="
                f"{self.tensor_parallel_size}; use 'mp'."
            )
