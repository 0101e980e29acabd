"""The errors ``AsyncLLM`` raises to its callers, in a module of their own so that both
``AsyncLLM`` and ``EngineMonitor`` can raise them. Import them from ``async_llm``, as the
server does (``entrypoints/openai`` maps each one to an HTTP status)."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine process died or was shut down; nothing more will be generated."""


class EngineUnresponsiveError(RuntimeError):
    """The engine process is alive but has sent nothing, not even a heartbeat, for longer than
    ``health_timeout_s``: it is stopped or stuck. It may still recover."""


class RequestTimeoutError(RuntimeError):
    """A request ran past its ``request_timeout_s``; it was aborted in the engine."""


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_waiting_requests`` allows."""
