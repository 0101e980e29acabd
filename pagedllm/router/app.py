"""The standalone router's FastAPI app: ``build_router_app(args)``.

It proxies the OpenAI routes (``POST /v1/completions``, ``/v1/chat/completions``,
``/v1/responses``, ``/tokenize``, ``/detokenize``; ``GET /v1/models``) to one healthy worker
each, chosen by the policy on the request's text (characters: the router does not tokenize,
as SGLang's router): the prompt, or the messages' contents in order. The request body and the
``Authorization`` / ``X-Request-Id`` headers go through unchanged; the worker's answer comes
back byte for byte as it arrives, so streaming (SSE) needs nothing special, and a client that
disconnects closes the worker's response (the worker then aborts the request).

Retries: a request that did not start (the worker cannot be reached, or answered 5xx before
any byte of a body was sent on) is sent to another healthy worker, at most ``max_retries``
times; a 4xx is the client's and is passed through. With no healthy worker, or retries spent,
the client gets 503 in OpenAI's error body (``code``: ``no_healthy_worker``). ``GET /health``
is 200 while some worker is healthy; ``GET /workers`` lists each worker's health, requests in
flight and requests routed (for operators and tests).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pagedllm.entrypoints.openai.errors import APIError, install_error_handlers
from pagedllm.router.policies import CacheAwarePolicy, Router, build_policy, policy_config_from_args
from pagedllm.router.workers import WorkerPool

logger = logging.getLogger(__name__)

POST_ROUTES = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/responses",
    "/tokenize",
    "/detokenize",
)
_FORWARDED_HEADERS = ("authorization", "x-request-id", "content-type", "accept")
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "content-encoding",
}


def routing_text(body: Any) -> str:
    """The text a request is routed on: its prompt (token ids as text), or its messages'
    contents in order (a shared system prompt is then a shared prefix)."""
    if not isinstance(body, dict):
        return ""
    prompt = body.get("prompt", body.get("input"))
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return " ".join(p if isinstance(p, str) else json.dumps(p) for p in prompt)
    parts: list[str] = []
    for msg in body.get("messages") or []:
        if not isinstance(msg, dict):
            continue
        content = msg.get("content")
        if isinstance(content, list):  # content parts: their text
            content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        parts.append(f"{msg.get('role', '')}: {content or ''}\n")
    return "".join(parts)


def _no_worker(detail: str) -> APIError:
    return APIError(
        503, f"No healthy worker can serve the request: {detail}", code="no_healthy_worker"
    )


class Proxy:
    """Sends one request to a worker chosen by the pool's router, retrying the ones that did
    not start (see the module docstring)."""

    def __init__(self, pool: WorkerPool, client: httpx.AsyncClient, max_retries: int) -> None:
        self.pool = pool
        self.client = client
        self.max_retries = max_retries

    async def forward(self, raw: Request, path: str, *, route: bool = True) -> Response:
        """Send ``raw`` on to ``path`` of a worker; ``route=False``: the first healthy one,
        not counted by the policy (``GET /v1/models``)."""
        body = await raw.body()
        text = ""
        if isinstance(self.pool.router.policy, CacheAwarePolicy):
            try:
                text = routing_text(json.loads(body)) if body else ""
            except ValueError:
                text = ""  # not JSON: the worker answers 400 with the details
        headers = {k: v for k, v in raw.headers.items() if k.lower() in _FORWARDED_HEADERS}
        tried: set[str] = set()
        last: str = "no worker is healthy"
        for _ in range(self.max_retries + 1):
            among = [u for u in self.pool.healthy() if u not in tried]
            if not among:
                break
            url = str(self.pool.router.route(text, len(text), among)) if route else among[0]
            if not route:
                self.pool.router.loads[url] += 1  # done() balances it when the answer ends
            tried.add(url)
            req = self.client.build_request(
                raw.method, url + path, content=body, headers=headers, params=raw.query_params
            )
            try:
                resp = await self.client.send(req, stream=True)
            except httpx.HTTPError as e:
                self.pool.router.done(url)
                last = f"{url}: {type(e).__name__}: {e}"
                self.pool.mark_down(url, last)
                continue
            if resp.status_code >= 500:
                await resp.aread()
                await resp.aclose()
                self.pool.router.done(url)
                last = f"{url}: HTTP {resp.status_code}: {resp.text[:200]}"
                logger.warning("Worker answered %d; retrying elsewhere: %s", resp.status_code, last)
                continue
            return self._relay(resp, url)
        raise _no_worker(last)

    def _relay(self, resp: httpx.Response, url: str) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()
                self.pool.router.done(url)

        headers = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP}
        return StreamingResponse(body(), status_code=resp.status_code, headers=headers)


def build_router_app(args: argparse.Namespace) -> FastAPI:
    """The router app for ``pagedllm router``'s flags (see ``cli.py``)."""
    policy = build_policy(args.policy, policy_config_from_args(args))
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(args.request_timeout, connect=args.connect_timeout)
    )
    pool = WorkerPool(
        args.worker_urls,
        Router(policy),
        client,
        health_check_interval=args.health_check_interval,
        health_check_timeout=args.health_check_timeout,
    )
    proxy = Proxy(pool, client, args.max_retries)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        logger.info("Router: %d of %d workers healthy.", len(pool.healthy()), len(pool.workers))
        yield
        await pool.stop()
        await client.aclose()

    app = FastAPI(title="pagedllm router", lifespan=lifespan)
    app.state.pool = pool
    install_error_handlers(app)

    for path in POST_ROUTES:

        async def post(raw: Request, _path: str = path) -> Response:
            return await proxy.forward(raw, _path)

        app.post(path, response_model=None)(post)

    @app.get("/v1/models", response_model=None)
    async def models(raw: Request) -> Response:
        return await proxy.forward(raw, "/v1/models", route=False)

    @app.get("/health")
    async def health() -> Response:
        if not pool.healthy():
            return _no_worker("every worker failed its health check").response()
        return Response(status_code=200)

    @app.get("/workers")
    async def workers() -> JSONResponse:
        return JSONResponse(
            [
                {
                    "url": w.url,
                    "healthy": w.healthy,
                    "in_flight": pool.router.loads.get(w.url, 0),
                    "routed": pool.router.routed.get(w.url, 0),
                    "last_error": w.last_error,
                }
                for w in pool.workers.values()
            ]
        )

    return app
