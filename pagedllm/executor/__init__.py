"""Executors: how the engine drives the model runner of every tensor-parallel rank.

``LLMEngine`` talks to one :class:`Executor`: ``uni`` wraps the in-process ``ModelRunner``
(one rank, no overhead); ``mp`` keeps rank 0 in the engine's process and starts ranks 1..N-1
as worker processes that receive each step as signed, pickled plain data and run the same
forward pass (``multiproc.py``, ``worker_proc.py``).
"""

from pagedllm.executor.base import Executor, make_executor, register_executor

__all__ = ["Executor", "make_executor", "register_executor"]
