"""One rank in the engine's own process: the model runner, called directly."""

from __future__ import annotations

import numpy as np

from pagedllm.config import EngineConfig
from pagedllm.core.scheduler_output import SchedulerOutput
from pagedllm.executor.base import Executor, register_executor
from pagedllm.worker.model_runner import ForwardOutput, ModelRunner
from pagedllm.worker.step_output import StepHandle


@register_executor("uni")
class UniProcExecutor(Executor):
    """The engine's ``ModelRunner`` behind the executor interface, nothing in between."""

    def __init__(self, config: EngineConfig) -> None:
        self.runner = ModelRunner(config)
        self.num_blocks = self.runner.num_blocks
        self.vocab_size = self.runner.vocab_size

    def execute_model(self, step: SchedulerOutput) -> ForwardOutput:
        return self.runner.execute_model(step)

    def sample_tokens(
        self,
        fwd: ForwardOutput,
        structured_seq_ids: list[str] | None = None,
        grammar_bitmask: np.ndarray | None = None,
    ) -> StepHandle:
        return self.runner.sample_tokens(fwd, structured_seq_ids, grammar_bitmask)

    def execute_async(self, step: SchedulerOutput) -> StepHandle:
        return self.runner.execute_async(step)
