"""Drive an in-process engine from many threads at once, so that their requests share steps.

A program's forks and a ``run_batch``'s programs call the backend from their own threads.
``LLM`` is not thread-safe and ``AsyncLLM`` lives on an event loop, so each gets a driver
that owns it on one thread: ``EngineLoop`` steps an ``LLMEngine`` whenever it has work and adds
every request submitted in the meantime before the next step (requests submitted together,
``submit_many``, always join the same step); ``AsyncDriver`` runs ``AsyncLLM.generate`` calls
on an event loop of its own. Callers get a ``Future`` of the final ``RequestOutput`` and, if
they ask, every output as it comes (streaming).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams

OnOutput = Callable[[RequestOutput], None]


@dataclass
class Submission:
    prompt_ids: list[int]
    params: SamplingParams
    on_output: OnOutput | None = None
    future: Future[RequestOutput] = field(default_factory=Future)


class EngineLoop:
    """Owns an ``LLMEngine`` on a daemon thread."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._inbox: queue.Queue[list[Submission] | None] = queue.Queue()
        self._live: dict[str, Submission] = {}
        self.peak_in_flight = 0  # most requests in the engine at once (reset it to measure)
        self._thread = threading.Thread(target=self._run, name="lang-engine", daemon=True)
        self._thread.start()

    def submit_many(self, subs: list[Submission]) -> list[Future[RequestOutput]]:
        if not self._thread.is_alive():
            raise RuntimeError("The engine loop has stopped.")
        self._inbox.put(subs)
        return [s.future for s in subs]

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(30)

    def _add(self, subs: list[Submission]) -> None:
        for s in subs:
            try:
                rid = self.engine.add_request(None, s.prompt_ids, s.params)
            except Exception as e:
                s.future.set_exception(e)
                continue
            self._live[rid] = s
        self.peak_in_flight = max(self.peak_in_flight, len(self._live))

    def _run(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished_requests()
                try:
                    item = self._inbox.get(block=block)
                    while True:
                        if item is None:
                            return
                        self._add(item)
                        item = self._inbox.get_nowait()
                except queue.Empty:
                    pass
                if self.engine.has_unfinished_requests():
                    self._step()
        except BaseException as e:  # the engine failed: every waiting caller learns why
            for s in self._live.values():
                s.future.set_exception(RuntimeError(f"The engine failed: {e!r}"))
            raise
        finally:
            for s in self._live.values():  # closed (or failed) with requests in flight
                if not s.future.done():
                    s.future.set_exception(RuntimeError("The engine loop has stopped."))
            self._drain_inbox()

    def _drain_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            for s in item or []:
                s.future.set_exception(RuntimeError("The engine loop has stopped."))

    def _step(self) -> None:
        for out in self.engine.step():
            s = self._live.get(out.request_id)
            if s is None:
                continue
            if s.on_output is not None:
                s.on_output(out)
            if out.finished:
                del self._live[out.request_id]
                s.future.set_result(out)


class AsyncDriver:
    """Runs ``AsyncLLM.generate`` calls on a private event loop thread."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._loop = asyncio.new_event_loop()
        self._ids = itertools.count()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="lang-async", daemon=True
        )
        self._thread.start()

    async def _one(self, s: Submission) -> RequestOutput:
        final: RequestOutput | None = None
        async for out in self.engine.generate(s.prompt_ids, s.params, f"lang-{next(self._ids)}"):
            if s.on_output is not None:
                s.on_output(out)
            final = out
        assert final is not None
        return final

    def submit_many(self, subs: list[Submission]) -> list[Future[RequestOutput]]:
        return [asyncio.run_coroutine_threadsafe(self._one(s), self._loop) for s in subs]

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
