"""``GateMiddleware`` in-process: a client that stops reading has its request ended within
``--write-timeout``, and writes that go through are not slowed down."""

from __future__ import annotations

import asyncio

import pytest

from pagedllm.entrypoints.openai.gate import ClientTooSlowError, GateMiddleware


async def _app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for _ in range(3):
        await send({"type": "http.response.body", "body": b"chunk", "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _scope() -> dict:  # type: ignore[type-arg]
    return {"type": "http", "method": "GET", "path": "/x", "headers": [], "client": None}


async def _receive() -> dict:  # type: ignore[type-arg]
    return {"type": "http.disconnect"}


def test_write_timeout_ends_a_stalled_response() -> None:
    gate = GateMiddleware(_app, None, None, 1000, None, write_timeout=0.2)
    sent: list[dict] = []  # type: ignore[type-arg]

    async def stalled_send(message: dict) -> None:  # type: ignore[type-arg]
        sent.append(message)
        if message["type"] == "http.response.body":
            await asyncio.sleep(3600)  # the client's receive window is full

    async def run() -> float:
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(ClientTooSlowError, match="--write-timeout"):
            await gate(_scope(), _receive, stalled_send)
        return asyncio.get_running_loop().time() - t0

    elapsed = asyncio.run(run())
    assert 0.2 <= elapsed < 1.0
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


def test_writes_that_complete_are_untouched() -> None:
    gate = GateMiddleware(_app, None, None, 1000, None, write_timeout=0.2)
    sent: list[dict] = []  # type: ignore[type-arg]

    async def send(message: dict) -> None:  # type: ignore[type-arg]
        sent.append(message)

    asyncio.run(gate(_scope(), _receive, send))
    assert len(sent) == 5 and sent[0]["status"] == 200
    assert dict(sent[0]["headers"])[b"x-request-id"]
