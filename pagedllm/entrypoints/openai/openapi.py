"""The OpenAPI document describes what the server really answers.

FastAPI's default document promises ``422 HTTPValidationError`` on every route with a body,
while we answer every failure with an OpenAI error object (``ErrorResponse``) and one of the
statuses below. ``responses(...)`` builds each route's documented answers and
``install_openapi`` removes FastAPI's 422 entries and their schemas, so a client generated from
``/openapi.json`` handles our errors.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from pagedllm.entrypoints.openai.protocol_responses import ErrorResponse

_ERRORS = {
    400: "Invalid request: a bad or unsupported field, a prompt that does not fit, bad JSON, "
    "a structured-output constraint that does not compile.",
    401: "Missing or invalid credentials (API key or JWT).",
    404: "The requested model does not exist.",
    408: "The request body did not arrive within --body-read-timeout.",
    413: "The request body exceeds --max-request-body-bytes.",
    429: "Rate limit of the caller exceeded; see the Retry-After header.",
    500: "Unexpected server error.",
    503: "The engine is not running or is overloaded (queue full, queue timeout).",
    504: "The request ran longer than --request-timeout.",
}
# One server-sent event: ``data`` is a JSON chunk, an OpenAI error object, or ``[DONE]``.
_SSE_EVENT = {
    "type": "object",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
    "required": ["data"],
}
_GENERATION = (400, 401, 404, 408, 413, 429, 500, 503, 504)
_SIMPLE_POST = (400, 401, 404, 408, 413, 429, 500)
_GET = (401, 429, 500)


def _errors(codes: tuple[int, ...]) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": _ERRORS[c]} for c in codes}


def generation_responses(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """Chat / completions: one JSON body, or an SSE stream of chunks when ``stream`` is set."""
    ok: dict[str, Any] = {
        "model": model,
        "description": "The completion; with stream=true, a text/event-stream of chunks "
        "('data: {chunk}' lines, then 'data: [DONE]').",
        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
    }
    return {200: ok, **_errors(_GENERATION)}


def post_responses() -> dict[int | str, dict[str, Any]]:
    return _errors(_SIMPLE_POST)


def get_responses() -> dict[int | str, dict[str, Any]]:
    return _errors(_GET)


def health_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {"description": "The engine is alive and responsive (empty body).", "content": {}},
        503: {"model": ErrorResponse, "description": "The engine is dead or unresponsive."},
    }


def metrics_responses() -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "description": "Prometheus metrics in the text exposition format.",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **_errors(_GET),
    }


def install_openapi(app: FastAPI) -> None:
    """Drop FastAPI's 422 validation responses and schemas from ``app``'s document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build()
        for item in doc.get("paths", {}).values():
            for op in item.values():
                if isinstance(op, dict):
                    op.get("responses", {}).pop("422", None)
        schemas = doc.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
