"""Where programs run: ``LocalBackend`` (in-process engine), ``Endpoint`` (a pagedllm server,
native routes) and ``OpenAIBackend`` (any OpenAI-compatible chat server)."""

from pagedllm.lang.backend.base import Backend, GenOutput, ScoredPrompt
from pagedllm.lang.backend.endpoint import Endpoint
from pagedllm.lang.backend.local import LocalBackend
from pagedllm.lang.backend.openai import OpenAIBackend

__all__ = ["Backend", "Endpoint", "GenOutput", "LocalBackend", "OpenAIBackend", "ScoredPrompt"]
