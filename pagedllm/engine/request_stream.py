"""``RequestStream``: where one ``AsyncLLM.generate()`` call waits for what comes of its request.

The reader task puts the request's outputs in as the engine sends them, and the generator
takes them out at its consumer's pace: an asyncio.Queue between the two. Whatever ends the
request early travels the same queue as an exception, so a waiting generator wakes for
whichever comes first: an output, the engine's rejection (ValueError / RuntimeError), the
engine's death (``EngineDeadError``), or its own deadline (``RequestTimeoutError``). The
deadline needs no task of its own, only one timer handle.
"""

from __future__ import annotations

import asyncio
import math

from pagedllm.engine.errors import RequestTimeoutError
from pagedllm.outputs import RequestOutput


class RequestStream:
    """One ``generate()`` call. ``engine_id`` is the id the engine knows the request by,
    unique per call; ``prompt`` / ``prompt_token_ids`` are put back into each output (the
    engine strips them to keep its messages small). Create it on the event loop."""

    def __init__(
        self,
        request_id: str,
        engine_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        timeout_s: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.engine_id = engine_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        # Outputs, the error that ends the request, or None when the timer goes off.
        self._queue: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._timeout_s = timeout_s
        self._deadline = math.inf
        self._timer: asyncio.TimerHandle | None = None
        if timeout_s is not None:
            self._deadline = self._loop.time() + timeout_s
            self._timer = self._loop.call_at(self._deadline, self._queue.put_nowait, None)

    def put(self, out: RequestOutput) -> None:
        out.request_id = self.request_id
        out.prompt = self.prompt
        out.prompt_token_ids = self.prompt_token_ids
        self._queue.put_nowait(out)

    def fail(self, error: BaseException) -> None:
        """End the stream: ``next_output()`` raises ``error`` once the outputs before it are
        read."""
        self._queue.put_nowait(error)

    async def next_output(self) -> RequestOutput:
        """The next output; raises what ended the request instead, or RequestTimeoutError once
        the deadline has passed (checked before waiting too: a slow consumer's time counts)."""
        if self._loop.time() < self._deadline:
            item = await self._queue.get()
            if isinstance(item, RequestOutput):
                return item
            if item is not None:
                raise item
        raise RequestTimeoutError(
            f"Request {self.request_id!r} did not finish within {self._timeout_s:g} s "
            "(request_timeout_s); it was aborted."
        )

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
