"""Streaming HTTP client of ``pagedllm bench serve``: one OpenAI-compatible request at a time.

Each request is sent with ``stream: true`` and ``stream_options.include_usage`` and read as
server-sent events (``data: {...}`` lines, ending with ``data: [DONE]``). Timestamps are
taken when a line arrives:

* TTFT: from sending the request to the first chunk whose text (``choices[0].text`` for
  ``/v1/completions``, ``choices[0].delta.content`` for ``/v1/chat/completions``) is
  non-empty; a chat stream's opening role chunk and empty finish chunks do not count;
* ITL: the gaps between consecutive non-empty content chunks;
* end-to-end latency: from sending the request to the end of the stream;
* output tokens: ``usage.completion_tokens`` of the usage chunk, when the server sends one.

A request fails on a non-200 status, an ``error`` event, a malformed event, a stream without
any choice, a timeout or a connection error; its ``error`` says which.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import aiohttp

DEFAULT_TIMEOUT_S = 6 * 3600.0
_READ_BUFSIZE = 1 << 22  # longest SSE line aiohttp may buffer


@dataclass
class ServeRequest:
    """One request: a token-id (completions) or text (chat) prompt and its output length."""

    prompt: list[int] | str
    prompt_len: int
    output_len: int
    response_format: dict[str, Any] | None = None  # structured output (None: free text)


@dataclass
class ServeResult:
    """What one request measured; times are seconds, ``start`` is ``time.perf_counter()``."""

    success: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    generated_text: str = ""
    usage_prompt_tokens: int | None = None
    usage_output_tokens: int | None = None
    num_content_chunks: int = 0


def is_chat_endpoint(endpoint: str) -> bool:
    """``True`` for ``.../chat/completions``, ``False`` for ``.../completions``."""
    path = endpoint.rstrip("/")
    if path.endswith("chat/completions"):
        return True
    if path.endswith("completions"):
        return False
    raise ValueError(
        f"--endpoint must end with /completions or /chat/completions, got {endpoint!r}."
    )


def _carries_no_tokens(chunk: dict[str, Any]) -> bool:
    """A chunk that only opens (chat role) or closes (finish_reason) a choice."""
    choices = chunk.get("choices") or []
    if not choices:
        return True
    first = choices[0]
    return first.get("finish_reason") is not None or "role" in (first.get("delta") or {})


def _chunk_text(chunk: dict[str, Any], chat: bool) -> str | None:
    """The content of a chunk's first choice ('' when empty), ``None`` without choices."""
    choices = chunk.get("choices")
    if not choices:
        return None
    first = choices[0]
    text = (first.get("delta") or {}).get("content") if chat else first.get("text")
    return text if isinstance(text, str) else ""


class ServeClient:
    """An aiohttp session against one OpenAI-compatible server (use ``async with``)."""

    def __init__(
        self,
        base_url: str,
        endpoint: str,
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_connections: int | None = None,
        sampling: dict[str, Any] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/" + endpoint.lstrip("/")
        self.chat = is_chat_endpoint(endpoint)
        self.model = ""
        self.sampling = dict(sampling or {})
        key = api_key or os.environ.get("OPENAI_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_connections = max_connections or 0  # 0: unlimited (aiohttp's default is 100)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ServeClient:
        connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            read_bufsize=_READ_BUFSIZE,
            trust_env=False,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("ServeClient is used outside 'async with'.")
        return self._session

    async def get_json(self, path: str, timeout_s: float = 30.0) -> Any:
        """``GET base_url + path`` as JSON; raises ``ValueError`` on any failure."""
        url = self.base_url + path
        try:
            timeout = aiohttp.ClientTimeout(total=timeout_s)
            async with self.session.get(url, headers=self.headers, timeout=timeout) as resp:
                if resp.status != 200:
                    body = (await resp.text())[:300]
                    raise ValueError(f"GET {url}: HTTP {resp.status}: {body}")
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
            raise ValueError(f"GET {url} failed: {type(e).__name__}: {e}") from e

    def payload(self, req: ServeRequest) -> dict[str, Any]:
        """The JSON body of ``req`` (sampling fields from the constructor added)."""
        body: dict[str, Any] = {"model": self.model}
        if self.chat:
            body["messages"] = [{"role": "user", "content": req.prompt}]
            body["max_completion_tokens"] = req.output_len
        else:
            body["prompt"] = req.prompt
            body["max_tokens"] = req.output_len
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        body.update(self.sampling)
        if req.response_format is not None:
            body["response_format"] = req.response_format
        return body

    async def send(self, req: ServeRequest) -> ServeResult:
        """Send ``req``, read its stream to the end and return what was measured."""
        res = ServeResult()
        res.start = last = time.perf_counter()
        first_choice: float | None = None
        try:
            async with self.session.post(
                self.url, json=self.payload(req), headers=self.headers
            ) as resp:
                if resp.status != 200:
                    res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                    return res
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue  # blank separators, ": comments", event/id fields
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        break
                    now = time.perf_counter()
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        res.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                        return res
                    usage = chunk.get("usage")
                    if usage:
                        res.usage_prompt_tokens = usage.get("prompt_tokens")
                        res.usage_output_tokens = usage.get("completion_tokens")
                    text = _chunk_text(chunk, self.chat)
                    if text is None:
                        continue
                    if first_choice is None:
                        first_choice = now
                    if not text and _carries_no_tokens(chunk):
                        continue  # TTFT/ITL count chunks that carry tokens, as vLLM's client
                    if res.num_content_chunks == 0:
                        res.ttft = now - res.start
                    else:
                        res.itl.append(now - last)
                    last = now
                    res.num_content_chunks += 1
                    res.generated_text += text
            res.latency = time.perf_counter() - res.start
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            res.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            return res
        if first_choice is None:
            res.error = "the stream had no choices"
            return res
        if res.num_content_chunks == 0:  # all text empty: time the first choice instead
            res.ttft = first_choice - res.start
        res.success = True
        return res
