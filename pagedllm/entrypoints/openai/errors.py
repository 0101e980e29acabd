"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` for every failure.

``APIError`` is raised anywhere in the serving code; ``install_error_handlers`` turns it, pydantic
validation errors, unknown routes and unexpected exceptions into that JSON body.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout",
}


class APIError(Exception):
    """An error the client sees as an OpenAI error object with ``status_code``."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or _TYPES.get(status_code, "server_error")
        self.param = param
        self.code = code
        self.headers = headers  # sent with the response (Retry-After, WWW-Authenticate, ...)

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        merged = {**(self.headers or {}), **(headers or {})}
        return JSONResponse(self.to_dict(), status_code=self.status_code, headers=merged or None)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def engine_dead() -> APIError:
    return APIError(
        503,
        "The inference engine is not running; the server cannot serve requests.",
        code="engine_dead",
    )


def queue_full() -> APIError:
    return APIError(
        503,
        "The server is overloaded (request queue full); retry later.",
        code="queue_full",
        headers={"Retry-After": "1"},
    )


def validation_error(exc: RequestValidationError) -> APIError:
    """Summarise pydantic errors as one message; ``param`` names the first offending field."""
    parts: list[str] = []
    param: str | None = None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        where = ".".join(loc) or "body"
        if param is None and loc and not loc[0].isdigit():  # (a JSON error's loc is an offset)
            param = loc[0]
        parts.append(f"{where}: {err.get('msg', 'invalid value')}")
    n = len(parts)
    message = f"{n} validation error{'s' if n != 1 else ''}: " + "; ".join(parts)
    return bad_request(message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error path of ``app`` to an OpenAI error object."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        if status == 404:
            message = f"No route {request.method} {request.url.path}."
        else:
            message = str(exc.detail) if exc.detail else HTTPStatus(status).phrase
        code = HTTPStatus(status).phrase.lower().replace(" ", "_")
        return APIError(status, message, code=code).response(headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("Unhandled error serving %s %s", request.method, request.url.path)
        return APIError(500, f"Internal server error: {type(exc).__name__}").response()
