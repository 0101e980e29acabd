"""SGLang's native routes, so SGLang's own frontend (``sgl.RuntimeEndpoint``) and
``pagedllm.lang.Endpoint`` run against ``pagedllm serve``.

``register_native_routes(app, args)`` adds to an app made by ``build_app``:

* ``POST /generate``: text or token ids in, ``{"text", "meta_info"}`` out, streamed or not
  (``native_serving.py``);
* ``GET /get_model_info``: ``{"model_path", "tokenizer_path", "is_generation"}`` (SGLang's
  frontend picks its chat template from ``model_path``);
* ``GET /get_server_info`` (and ``/server_info``, the newer spelling): the serving limits;
* ``GET /health_generate``: 200 once a one-token generation has gone through the engine;
* ``POST /flush_cache``: the engine forgets every cached prefix block (200), or a 400
  ``requests_running`` while requests hold blocks, as SGLang answers.

They sit behind the same ``GateMiddleware`` as the OpenAI routes (API key / JWT, rate limits,
body limits), use the same error bodies, and refuse work while the engine is dead or wedged.
Registering twice is a no-op, so a test's call and ``build_app``'s can coexist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

import pagedllm
from pagedllm.entrypoints.openai.errors import APIError, engine_dead
from pagedllm.entrypoints.openai.native_protocol import (
    GenerateRequest,
    GenerateResponse,
    ModelInfo,
    ServerInfo,
)
from pagedllm.entrypoints.openai.native_serving import NativeServing
from pagedllm.entrypoints.openai.openapi import (
    generation_responses,
    get_responses,
    health_responses,
    post_responses,
)
from pagedllm.entrypoints.openai.server_state import ServerState, random_id
from pagedllm.sampling_params import SamplingParams

_HEALTH_TIMEOUT_S = 10.0


def _public_name(model: str) -> str:
    """A model as the client may see it: a local path is reduced to its last component."""
    path = Path(model)
    return path.name if path.is_absolute() or path.exists() else model


def register_native_routes(app: FastAPI, args: Any) -> None:
    """Add SGLang's native routes to ``app`` (built by ``build_app(engine, args)``)."""
    if any(getattr(r, "path", None) == "/generate" for r in app.routes):
        return
    state: ServerState = app.state.server
    engine = state.engine
    serving = NativeServing(state)
    health_timeout = float(getattr(args, "engine_health_timeout", None) or 10.0)

    def model_paths() -> tuple[str, str]:
        """(model, tokenizer) as the client may see them (read when asked: ``build_app``
        may run on an engine that is not started yet)."""
        mc = engine.config.model_config
        model = getattr(args, "model", None) or getattr(args, "model_flag", None) or mc.model
        tokenizer = getattr(mc, "tokenizer", None) or model
        return _public_name(str(model)), _public_name(str(tokenizer))

    def require_engine() -> None:
        if not engine.is_running or engine.is_wedged(health_timeout):
            raise engine_dead()

    @app.post("/generate", response_model=None, responses=generation_responses(GenerateResponse))
    async def generate(body: GenerateRequest, raw: Request) -> Response:
        """SGLang's native generation route (see ``native_serving``)."""
        require_engine()
        return await serving.create(body, raw, raw.state.request_id)

    @app.get("/get_model_info", responses=get_responses())
    async def get_model_info() -> ModelInfo:
        model_path, tokenizer_path = model_paths()
        return ModelInfo(
            model_path=model_path,
            tokenizer_path=tokenizer_path,
            is_generation=True,
            served_model_names=state.served_model_names,
        )

    async def server_info() -> ServerInfo:
        cfg = engine.config
        return ServerInfo(
            version=pagedllm.__version__,
            model_path=model_paths()[0],
            served_model_names=state.served_model_names,
            max_model_len=state.max_model_len,
            max_num_seqs=cfg.scheduler_config.max_num_seqs,
            max_num_batched_tokens=cfg.scheduler_config.max_num_batched_tokens,
            block_size=cfg.cache_config.block_size,
            enable_prefix_caching=cfg.cache_config.enable_prefix_caching,
            max_n=state.max_n,
            max_seqs_per_request=state.max_seqs_per_request,
        )

    for path in ("/get_server_info", "/server_info"):
        app.get(path, responses=get_responses())(server_info)

    @app.get("/health_generate", response_class=Response, responses=health_responses())
    async def health_generate() -> Response:
        """200 once one token has been generated: the whole path, not only the process."""
        if not engine.is_running:
            return engine_dead().response()
        params = SamplingParams(temperature=0.0, max_tokens=1)
        bos = engine.tokenizer.bos_token_id
        prompt = [bos if bos is not None else 0]
        rid = random_id("health")
        try:
            async for _ in engine.generate(
                prompt, params, rid, request_timeout_s=_HEALTH_TIMEOUT_S
            ):
                pass
        except Exception as e:
            return APIError(503, f"A test generation failed: {e}", code="unhealthy").response()
        return Response(status_code=200)

    flushed = {"description": "Flushed.", "content": {"text/plain": {"schema": {"type": "string"}}}}

    @app.post("/flush_cache", response_model=None, responses={200: flushed, **post_responses()})
    async def flush_cache() -> Response:
        require_engine()
        if not await engine.reset_prefix_cache():
            raise APIError(
                400,
                "The prefix cache was not flushed: requests are running (their blocks are in "
                "use). Retry when the server is idle.",
                code="requests_running",
            )
        return Response("Cache flushed.\n", media_type="text/plain")
