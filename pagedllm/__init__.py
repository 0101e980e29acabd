"""pagedllm: a high-throughput, memory-efficient LLM inference engine.

The public names are imported on first use (PEP 562), so importing a light submodule such as
``pagedllm.config`` (the CLI's ``--help``, the torch-free ``core/``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig
    from pagedllm.entrypoints.llm import LLM
    from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
    from pagedllm.sampling_params import RequestOutputKind, SamplingParams

_EXPORTS = {
    "LLM": "pagedllm.entrypoints.llm",
    "CompletionOutput": "pagedllm.outputs",
    "EngineConfig": "pagedllm.config",
    "Logprob": "pagedllm.outputs",
    "RequestOutput": "pagedllm.outputs",
    "RequestOutputKind": "pagedllm.sampling_params",
    "SamplingParams": "pagedllm.sampling_params",
}

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "Logprob",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pagedllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
