"""`ParallelConfig`: how many GPUs one engine spreads over.

Only one GPU per engine is implemented today. The flags exist already (spelled like vLLM's) so
that scripts and the config objects keep their shape when tensor and data parallelism arrive;
until then anything but 1 is refused up front with a clear message, rather than silently
running on one GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.config.utils import check_at_least, config_error


@dataclass
class ParallelConfig:
    """Parallelism: tensor- and data-parallel sizes (1 only, for now)."""

    tensor_parallel_size: int = field(
        default=1,
        metadata={
            "help": "GPUs one model is split over (tensor parallelism; only 1 is supported yet)",
            "aliases": ["-tp"],
        },
    )
    data_parallel_size: int = field(
        default=1,
        metadata={
            "help": "engine replicas serving requests side by side (only 1 is supported yet)",
            "aliases": ["-dp"],
        },
    )

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "data_parallel_size"):
            check_at_least(self, name, 1)
            value = getattr(self, name)
            if value != 1:
                raise config_error(
                    f"{name}={value} is not supported yet: pagedllm runs one engine on one "
                    f"device; use {name}=1."
                )
