"""``GateMiddleware``: what every request passes before it reaches a route.

In order: an ``X-Request-Id`` on every response (the client's, or a fresh one); credentials
(``--api-key`` / JWT, see ``auth.py``) on every route but the open ones (``/health``,
``/ping``); the per-subject request and token rate limits (429 with ``Retry-After``); and the
request body, read here in full under two limits — ``--max-request-body-bytes`` (413, by
``Content-Length`` or by the bytes actually received) and ``--body-read-timeout`` (408: a client
that trickles its body in cannot hold a connection and a task forever). Everything is answered
as an OpenAI error object. On the way out, ``--write-timeout`` bounds each write: a client that
stops reading its stream has its request ended (and its KV blocks freed) and its connection
closed.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedllm.entrypoints.openai.auth import Authenticator, RateLimiter
from pagedllm.entrypoints.openai.errors import APIError

OPEN_PATHS = frozenset({"/health", "/ping"})
_UNLIMITED_PATHS = OPEN_PATHS | {"/metrics"}  # probes and scrapes are not rate limited
_REQUEST_ID_RE = re.compile(r"^[\x21-\x7e]{1,128}$")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def route_path(scope: Scope) -> str:
    """The path the routes see: behind ``--root-path`` the request's path carries the root
    path as a prefix, which the open and unlimited paths must not depend on."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


class ClientTooSlowError(Exception):
    """The client stopped reading the response: the request ends and the connection closes."""


class GateMiddleware:
    """Request ids, authentication, rate limits and the request-body limits (see module doc)."""

    def __init__(
        self,
        app: ASGIApp,
        auth: Authenticator | None,
        rate_limiter: RateLimiter | None,
        max_body_bytes: int,
        body_read_timeout: float | None,
        write_timeout: float | None = None,
    ) -> None:
        self.app = app
        self.auth = auth
        self.rate_limiter = rate_limiter
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout = body_read_timeout
        self.write_timeout = write_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID_RE.match(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            if self.write_timeout is None:
                await send(message)
                return
            try:  # a client that stops reading must not hold its request (and KV) forever
                await asyncio.wait_for(send(message), self.write_timeout)
            except asyncio.TimeoutError:
                raise ClientTooSlowError(
                    f"The client read nothing for {self.write_timeout:g} s (--write-timeout)."
                ) from None

        try:
            self._admit(scope, headers, state)
            if scope["method"] in _BODY_METHODS:
                receive = _replay(await self._read_body(headers, receive), receive)
        except APIError as err:
            await err.response()(scope, receive, send_with_id)
            return
        await self.app(scope, receive, send_with_id)

    def _admit(self, scope: Scope, headers: Headers, state: dict) -> None:
        """Authenticate and rate-limit; raise APIError (401 / 429) to refuse."""
        path = route_path(scope)
        if path in OPEN_PATHS:
            return
        subject: str | None = None
        if self.auth is not None:
            try:
                principal = self.auth.authenticate(headers.get("authorization"))
            except APIError as err:
                err.headers = {"WWW-Authenticate": self.auth.www_authenticate(err)}
                raise
            state["principal"] = principal
            subject = principal.subject
        if self.rate_limiter is None or path in _UNLIMITED_PATHS:
            return
        if subject is None:  # an open server limits per client address
            client = scope.get("client")
            subject = f"ip:{client[0] if client else 'unknown'}"
        try:
            self.rate_limiter.check(subject)
        except APIError as err:
            err.headers = {**(err.headers or {}), "Retry-After": str(err.retry_after)}
            raise
        state["rate_subject"] = subject

    async def _read_body(self, headers: Headers, receive: Receive) -> bytes:
        """The whole body, within the size and time limits (413 / 408 otherwise)."""
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise self._too_large()
        timeout = self.body_read_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        parts: list[bytes] = []
        size = 0
        while True:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                message = await asyncio.wait_for(receive(), remaining)
            except asyncio.TimeoutError:
                err = APIError(
                    408,
                    f"The request body was not received within {timeout:g} s "
                    "(--body-read-timeout).",
                    code="request_timeout",
                )
                err.headers = {"Connection": "close"}
                raise err from None
            if message["type"] != "http.request":  # disconnected: let the route notice
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            parts.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(parts)

    def _too_large(self) -> APIError:
        err = APIError(
            413,
            f"Request body exceeds the limit of {self.max_body_bytes} bytes.",
            code="request_too_large",
        )
        err.headers = {"Connection": "close"}
        return err


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
