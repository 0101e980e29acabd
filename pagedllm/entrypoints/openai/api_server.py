"""The FastAPI app: ``build_app(engine, args)`` wires routes, errors, auth, limits and metrics.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses``
(``responses_api.py``), ``GET /v1/models``,
``GET /v1/models/{model}``, ``GET /health``, ``GET /ping``, ``GET /metrics``, ``POST /tokenize``,
``POST /detokenize``, ``GET /version`` and, with ``--enable-tokenizer-info-endpoint``,
``GET /tokenizer_info`` (``routes_misc.py``); with ``--ui``, the web chat page at ``/ui``
(``ui.py``); SGLang's native routes (``POST /generate``, ``GET /get_model_info``,
``GET /get_server_info``, ``GET /health_generate``, ``POST /flush_cache``: ``native_routes.py``),
so SGLang's own frontend and ``pagedllm.lang.Endpoint`` run against this server.

``GateMiddleware`` (``gate.py``) runs in front of every route: request ids, authentication,
rate limits and the body limits. ``CORSMiddleware`` runs in front of the gate, so that a
browser's preflight is answered without credentials (``cli_http.py`` has the flags). The
lifespan also runs the periodic stats log line (``stats_log.py``) unless
``--disable-log-stats``. ``/health`` is 200 only while the engine process is alive and
has answered within ``--engine-health-timeout`` (a wedged engine turns it 503); with
data-parallel replicas (``-dp N``), while at least one replica does (a dead replica fails only
its own requests; ``/metrics`` shows it as ``pagedllm:engine_up{engine="i"} 0``). The lifespan
shuts the engines down after uvicorn has drained in-flight requests.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

import pagedllm
from pagedllm.entrypoints.openai.auth import build_auth, build_rate_limiter
from pagedllm.entrypoints.openai.cli_http import cors_kwargs, fastapi_kwargs
from pagedllm.entrypoints.openai.errors import bad_request, engine_dead, install_error_handlers
from pagedllm.entrypoints.openai.gate import GateMiddleware
from pagedllm.entrypoints.openai.metrics import ServerMetrics
from pagedllm.entrypoints.openai.native_routes import register_native_routes
from pagedllm.entrypoints.openai.openapi import (
    generation_responses,
    get_responses,
    health_responses,
    install_openapi,
    metrics_responses,
    post_responses,
)
from pagedllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    reject_unsupported,
    reject_unsupported_tools,
)
from pagedllm.entrypoints.openai.protocol_responses import (
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
    VersionResponse,
)
from pagedllm.entrypoints.openai.responses_api import install_responses_route
from pagedllm.entrypoints.openai.routes_misc import install_misc_routes
from pagedllm.entrypoints.openai.server_state import MAX_LOGPROBS, ServerState, check_unicode
from pagedllm.entrypoints.openai.serving_chat import ChatServing
from pagedllm.entrypoints.openai.serving_completion import CompletionServing
from pagedllm.entrypoints.openai.stats_log import log_stats_forever
from pagedllm.entrypoints.openai.tool_calls import check_tools
from pagedllm.entrypoints.openai.tool_parsers import get_tool_parser

if TYPE_CHECKING:
    from pagedllm.engine.async_llm import AsyncLLM

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
_STATS_TIMEOUT_S = 10.0


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
    return [str(model or engine.config.model_config.model)]


def _model_root(args: Any, names: list[str]) -> str:
    """What ``/v1/models`` reports as ``root``: never a local absolute path."""
    model = getattr(args, "model", None) or getattr(args, "model_flag", None)
    if model is None:
        return names[0]
    return Path(model).name if Path(model).is_absolute() or Path(model).exists() else str(model)


def build_app(engine: AsyncLLM, args: argparse.Namespace | Any) -> FastAPI:
    """The OpenAI-compatible app around a started ``AsyncLLM``; ``args`` are the serve flags
    (missing ones take their defaults)."""
    names = served_model_names(args, engine)
    rate_limiter = build_rate_limiter(args)
    parser = _opt(args, "tool_call_parser", None)
    if parser is not None:
        get_tool_parser(parser)  # ValueError naming the known parsers
    state = ServerState(
        engine=engine,
        served_model_names=names,
        metrics=ServerMetrics(names[0]),
        max_n=int(_opt(args, "max_n", 128)),
        max_seqs_per_request=int(_opt(args, "max_seqs_per_request", 1024)),
        queue_timeout=_opt(args, "queue_timeout", None),
        request_timeout=_opt(args, "request_timeout", None),
        chat_template=_opt(args, "chat_template", None),
        log_requests=not _opt(args, "disable_log_requests", False),
        rate_limiter=rate_limiter,
        tokenizer_pool_size=int(_opt(args, "tokenizer_pool_size", 4)),
        enable_auto_tool_choice=bool(_opt(args, "enable_auto_tool_choice", False)),
        tool_call_parser=_opt(args, "tool_call_parser", None),
        max_logprobs=int(_opt(args, "max_logprobs", MAX_LOGPROBS)),
    )
    chat = ChatServing(state)
    completion = CompletionServing(state)

    log_stats = not _opt(args, "disable_log_stats", False)
    stats_interval = float(_opt(args, "log_stats_interval", 10.0))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start_monitoring()  # notice an engine death even with no traffic
        stats_task = (
            asyncio.create_task(log_stats_forever(engine, stats_interval)) if log_stats else None
        )
        yield
        if stats_task is not None:
            stats_task.cancel()
        logger.info("Shutting down the engine.")
        engine.shutdown()
        state.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="pagedllm OpenAI-compatible server", lifespan=lifespan, **fastapi_kwargs(args)
    )
    app.state.server = state
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(
        GateMiddleware,
        auth=build_auth(args),
        rate_limiter=rate_limiter,
        max_body_bytes=int(_opt(args, "max_request_body_bytes", DEFAULT_MAX_BODY_BYTES)),
        body_read_timeout=_opt(args, "body_read_timeout", None),
        write_timeout=_opt(args, "write_timeout", None),
    )
    if _opt(args, "ui", False):  # in front of the gate: a page load carries no API key
        from pagedllm.entrypoints.openai.ui import UIMiddleware

        app.add_middleware(UIMiddleware)
    app.add_middleware(CORSMiddleware, **cors_kwargs(args))  # added last: outermost

    health_timeout = float(_opt(args, "engine_health_timeout", 10.0))

    def require_engine() -> None:
        """503 at once when the engine is dead, or alive but silent (wedged): new requests
        would only queue behind it."""
        if not engine.is_running or engine.is_wedged(health_timeout):
            raise engine_dead()

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        responses=generation_responses(ChatCompletionResponse),
    )
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        require_engine()
        return await chat.create(body, raw, raw.state.request_id)

    @app.post(
        "/v1/completions", response_model=None, responses=generation_responses(CompletionResponse)
    )
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        require_engine()
        return await completion.create(body, raw, raw.state.request_id)

    def model_card(name: str) -> ModelCard:
        max_len = engine.input_processor.max_model_len
        return ModelCard(id=name, root=_model_root(args, names), max_model_len=max_len)

    install_responses_route(app, chat, require_engine)

    @app.get("/v1/models", responses=get_responses())
    async def models() -> ModelList:
        return ModelList(data=[model_card(n) for n in names])

    install_misc_routes(
        app,
        engine,
        names,
        model_card,
        tokenizer_info=bool(_opt(args, "enable_tokenizer_info_endpoint", False)),
        chat_template=state.chat_template,
    )

    async def health() -> Response:
        try:
            if not engine.is_running:
                raise RuntimeError("engine not running")
            await engine.check_health()
        except Exception as e:
            logger.warning("Health check failed: %s", e)
            return engine_dead().response()
        return Response(status_code=200)

    for path in ("/health", "/ping"):  # /ping: SageMaker's spelling of the same probe
        app.api_route(
            path, methods=["GET", "HEAD"], response_class=Response, responses=health_responses()
        )(health)

    @app.get("/metrics", response_class=Response, responses=metrics_responses())
    async def metrics() -> Response:
        if engine.is_running:
            try:
                stats = await asyncio.wait_for(engine.get_stats(), _STATS_TIMEOUT_S)
                state.metrics.update_engine_stats(stats)
            except Exception:  # a dead engine still lets the serving metrics be scraped
                logger.debug("get_stats failed", exc_info=True)
        if len(engine.replicas) > 1:  # no round trip: each replica's last report
            replicas = await engine.get_replica_stats()
            state.metrics.update_replica_stats(replicas, engine.router.routed)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize", responses=post_responses())
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        reject_unsupported(body)
        chat.model_name(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("Pass exactly one of prompt or messages.", "prompt")
        if body.tools and body.messages is None:
            raise bad_request("tools are rendered with messages only.", "tools")
        if body.messages is not None:
            reject_unsupported_tools(body.tools)
            tools = check_tools(body.tools)
            ids = await chat.render_checked(body.messages, body.add_generation_prompt, tools)
        else:
            text, special = body.prompt, body.add_special_tokens
            state.check_text_fits(len(text), "prompt")

            def encode() -> list[int]:
                check_unicode(text, "prompt")
                return list(engine.tokenizer.encode(text, add_special_tokens=special))

            ids = await chat.off_loop(encode)
        strs = engine.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return TokenizeResponse(
            count=len(ids), max_model_len=state.max_model_len, tokens=ids, token_strs=strs
        )

    @app.post("/detokenize", responses=post_responses())
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        reject_unsupported(body)
        chat.model_name(body.model)
        if not engine.input_processor.in_vocab(body.tokens):
            vocab = engine.input_processor.vocab_size
            raise bad_request(f"Token ids must be in [0, {vocab}).", "tokens")
        text = await chat.off_loop(engine.tokenizer.decode, body.tokens)
        return DetokenizeResponse(prompt=str(text))

    @app.get("/version", responses=get_responses())
    async def version() -> VersionResponse:
        return VersionResponse(version=pagedllm.__version__)

    register_native_routes(app, args)
    return app
