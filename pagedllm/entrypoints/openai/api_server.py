"""The FastAPI app: ``build_app(engine, args)`` wires routes, errors, auth, limits and metrics.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics``, ``POST /tokenize``, ``POST /detokenize``, ``GET /version``.

One ASGI middleware in front of the routes gives every response an ``X-Request-Id`` (the
client's, or a fresh one), checks ``Authorization: Bearer <--api-key>`` on every route but
``/health``, and answers 413 when the body exceeds ``--max-request-body-bytes`` (by
``Content-Length`` or by the bytes actually received). The lifespan shuts the engine down
after uvicorn has drained in-flight requests.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import pagedllm
from pagedllm.entrypoints.openai.errors import (
    APIError,
    bad_request,
    engine_dead,
    install_error_handlers,
)
from pagedllm.entrypoints.openai.metrics import ServerMetrics
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from pagedllm.entrypoints.openai.serving_base import ServerState
from pagedllm.entrypoints.openai.serving_chat import ChatServing
from pagedllm.entrypoints.openai.serving_completion import CompletionServing

if TYPE_CHECKING:
    from pagedllm.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
_OPEN_PATHS = frozenset({"/health"})
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_HEALTH_TIMEOUT_S = 10.0


class GateMiddleware:
    """Request ids, API-key auth and the request-body size limit, in front of every route."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID_RE.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        if self.expected is not None and scope["path"] not in _OPEN_PATHS:
            auth = headers.get("authorization", "").encode()
            if not secrets.compare_digest(auth, self.expected):
                err = APIError(401, "Invalid or missing API key.", code="invalid_api_key")
                await err.response({"WWW-Authenticate": "Bearer"})(scope, receive, send_with_id)
                return
        if scope["method"] in _BODY_METHODS:
            body = await self._read_body(headers, receive)
            if body is None:
                err = APIError(
                    413,
                    f"Request body exceeds the limit of {self.max_body_bytes} bytes.",
                    code="request_too_large",
                )
                await err.response({"Connection": "close"})(scope, receive, send_with_id)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send_with_id)

    async def _read_body(self, headers: Headers, receive: Receive) -> bytes | None:
        """The whole body, or None when it is (announced or found to be) over the limit."""
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return None
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnected: let the route notice
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that first hands out ``body``, then defers to the server (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _opt(args: Any, name: str, default: Any) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def served_model_names(args: Any, engine: AsyncLLM) -> list[str]:
    names = _opt(args, "served_model_name", None)
    if isinstance(names, str):
        names = [names]
    if names:
        return list(names)
    model = getattr(args, "model", None) or getattr(args, "model_flag", None)
    return [str(model or engine.config.model)]


def build_app(engine: AsyncLLM, args: argparse.Namespace | Any) -> FastAPI:
    """The OpenAI-compatible app around a started ``AsyncLLM``; ``args`` are the serve flags
    (missing ones take their defaults)."""
    names = served_model_names(args, engine)
    chat_template = _opt(args, "chat_template", None)
    state = ServerState(
        engine=engine,
        served_model_names=names,
        metrics=ServerMetrics(names[0]),
        max_n=int(_opt(args, "max_n", 128)),
        queue_timeout=_opt(args, "queue_timeout", None),
        chat_template=chat_template,
        log_requests=not _opt(args, "disable_log_requests", False),
    )
    chat = ChatServing(state)
    completion = CompletionServing(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        logger.info("Shutting down the engine.")
        engine.shutdown()

    app = FastAPI(title="pagedllm OpenAI-compatible server", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(
        GateMiddleware,
        api_key=_opt(args, "api_key", None),
        max_body_bytes=int(_opt(args, "max_request_body_bytes", DEFAULT_MAX_BODY_BYTES)),
    )

    def require_engine() -> None:
        if not engine.is_running:
            raise engine_dead()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        require_engine()
        return await chat.create(body, raw, raw.state.request_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        require_engine()
        return await completion.create(body, raw, raw.state.request_id)

    @app.get("/v1/models")
    async def models() -> ModelList:
        max_len = engine.config.max_model_len
        root = str(engine.config.model)
        return ModelList(data=[ModelCard(id=n, root=root, max_model_len=max_len) for n in names])

    @app.get("/health")
    async def health() -> Response:
        try:
            if not engine.is_running:
                raise RuntimeError("engine not running")
            await asyncio.wait_for(engine.check_health(), _HEALTH_TIMEOUT_S)
        except Exception:
            return engine_dead().response()
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        if engine.is_running:
            try:
                stats = await asyncio.wait_for(engine.get_stats(), _HEALTH_TIMEOUT_S)
                state.metrics.update_engine_stats(stats)
            except Exception:  # a dead engine still lets the serving metrics be scraped
                logger.debug("get_stats failed", exc_info=True)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        chat.model_name(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("Pass exactly one of prompt or messages.", "prompt")
        if body.messages is not None:
            ids = chat.render(body.messages, body.add_generation_prompt)
        else:
            ids = list(
                engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            )
        strs = engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        max_len = engine.config.max_model_len
        assert max_len is not None
        return TokenizeResponse(count=len(ids), max_model_len=max_len, tokens=ids, token_strs=strs)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        chat.model_name(body.model)
        vocab = engine.config.model_config.vocab_size
        if any(not 0 <= t < vocab for t in body.tokens):
            raise bad_request(f"Token ids must be in [0, {vocab}).", "tokens")
        return DetokenizeResponse(prompt=str(engine.tokenizer.decode(body.tokens)))

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": pagedllm.__version__})

    return app
