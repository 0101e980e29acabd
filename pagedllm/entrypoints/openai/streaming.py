"""Streaming plumbing shared by chat and completions: racing client disconnects, mapping
engine exceptions to OpenAI errors, and the ``stream_options`` chunk formatting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import Request

from pagedllm.engine.async_llm import EngineDeadError, QueueFullError, RequestTimeoutError
from pagedllm.entrypoints.openai.errors import APIError, bad_request, engine_dead, queue_full
from pagedllm.outputs import RequestOutput

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client went away before the answer was complete."""


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def race_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` unless the client disconnects first (then cancel it and raise)."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientDisconnected()
    return task.result()


def map_engine_error(exc: BaseException) -> APIError | None:
    """The client-facing error for an exception out of ``AsyncLLM``; None if unexpected."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return queue_full()
    if isinstance(exc, RequestTimeoutError):
        return APIError(504, str(exc), code="request_timeout")
    if isinstance(exc, EngineDeadError):
        return engine_dead()
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    return None


async def chain(
    first: tuple[int, RequestOutput], rest: AsyncIterator[tuple[int, RequestOutput]]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    yield first
    async for item in rest:
        yield item


class StreamOptionsMixin:
    """``stream_options`` handling shared by the chat and completions formatters."""

    req: Any
    id: str
    created: int
    model: str

    def _stream_chunk(self, chunk_cls: Any, choice: Any, usage: Any = None) -> str:
        """One SSE payload with a single choice; usage only when the client asked for it."""
        chunk = chunk_cls(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=usage if self._continuous_usage else None,
        )
        return chunk.model_dump_json(exclude=None if self._include_usage else {"usage"})

    @property
    def _include_usage(self) -> bool:
        opts = self.req.stream_options
        return bool(opts and opts.include_usage)

    @property
    def _continuous_usage(self) -> bool:
        opts = self.req.stream_options
        return bool(opts and opts.include_usage and opts.continuous_usage_stats)
