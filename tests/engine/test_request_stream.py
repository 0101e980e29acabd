"""``RequestStream``: outputs and errors in order, and a deadline that wakes a waiting consumer
and catches a late one."""

from __future__ import annotations

import asyncio

import pytest

from pagedllm.engine.errors import RequestTimeoutError
from pagedllm.engine.request_stream import RequestStream
from pagedllm.outputs import RequestOutput


def _output(finished: bool = False) -> RequestOutput:
    return RequestOutput("r@1", None, [], None, [], finished)


@pytest.mark.asyncio
async def test_outputs_then_error() -> None:
    stream = RequestStream("r", "r@1", "hi", [1, 2])
    stream.put(_output())
    stream.fail(ValueError("rejected"))
    out = await stream.next_output()
    assert (out.request_id, out.prompt, out.prompt_token_ids) == ("r", "hi", [1, 2])
    with pytest.raises(ValueError, match="rejected"):
        await stream.next_output()
    stream.close()


@pytest.mark.asyncio
async def test_deadline() -> None:
    loop = asyncio.get_running_loop()
    stream = RequestStream("r", "r@1", None, [1], timeout_s=0.1)
    t0 = loop.time()
    with pytest.raises(RequestTimeoutError, match=r"'r' did not finish within 0.1 s"):
        await stream.next_output()  # woken by the timer
    assert 0.09 <= loop.time() - t0 < 0.5

    late = RequestStream("r", "r@2", None, [1], timeout_s=0.05)
    await asyncio.sleep(0.06)
    late.put(_output())
    with pytest.raises(RequestTimeoutError):  # an output is there, but the time is up
        await late.next_output()

    within = RequestStream("r", "r@3", None, [1], timeout_s=5)
    within.put(_output(finished=True))
    assert (await within.next_output()).finished
    within.close()
    assert within._timer is not None and within._timer.cancelled()
