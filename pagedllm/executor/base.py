"""The interface between the engine and its model runner(s), and the executor registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.worker.model_runner import ForwardOutput, ModelRunner
from pagedllm.worker.step_output import StepHandle


class Executor(ABC):
    """Runs each scheduled step on every rank; the engine reads results from rank 0.

    ``num_blocks`` is the KV pool every rank holds (the smallest over the ranks) and
    ``vocab_size`` the model's; ``execute_model`` + ``sample_tokens`` are a step's two halves
    (the engine fills a grammar bitmask in between), ``execute_async`` both at once. Every call
    reaches every rank in the same order, including steps that schedule nothing (they still
    apply finishes), so the ranks' collectives always pair up.
    """

    num_blocks: int
    vocab_size: int
    runner: ModelRunner  # rank 0's, in the engine's process (stats, tools, tests)

    @abstractmethod
    def execute_model(self, step: SchedulerOutput) -> ForwardOutput: ...

    @abstractmethod
    def sample_tokens(
        self,
        fwd: ForwardOutput,
        structured_seq_ids: list[str] | None = None,
        grammar_bitmask: np.ndarray | None = None,
    ) -> StepHandle: ...

    def execute_async(self, step: SchedulerOutput) -> StepHandle:
        return self.sample_tokens(
            self.execute_model(step), step.structured_seq_ids, step.grammar_bitmask
        )

    def execute(self, step: SchedulerOutput):  # type: ignore[no-untyped-def]
        """Run one step and wait for its results (tests and tools)."""
        return self.execute_async(step).get()

    def check_health(self) -> None:  # noqa: B027 - one rank: nothing can die apart
        """Raise if a rank has died (the engine calls it every step: it must be cheap)."""

    def shutdown(self) -> None:  # noqa: B027 - one rank: nothing to stop
        """Stop the ranks this executor started (idempotent)."""


_EXECUTORS: dict[str, Callable[[EngineConfig], Executor]] = {}


def register_executor(name: str) -> Callable[[type[Executor]], type[Executor]]:
    """Class decorator: make an executor selectable as ``distributed_executor_backend``."""

    def add(cls: type[Executor]) -> type[Executor]:
        _EXECUTORS[name] = cls
        return cls

    return add


def make_executor(config: EngineConfig) -> Executor:
    """The executor ``config.parallel_config`` asks for (``mp`` with one rank is ``uni``)."""
    from pagedllm.executor import multiproc, uniproc  # noqa: F401  (register themselves)

    pc = config.parallel_config
    name = pc.distributed_executor_backend
    if pc.tensor_parallel_size == 1:
        name = "uni"
    assert name is not None
    return _EXECUTORS[name](config)
