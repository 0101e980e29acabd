"""uvicorn's h11 protocol with a deadline for the request line and headers.

uvicorn times out idle keep-alive connections, but not a client that opens a connection and
sends its headers a byte at a time (slowloris): such a connection and its buffers are held
forever, and so is a connection that sends nothing at all. ``HeaderTimeoutH11Protocol`` arms
a timer when a connection opens and when the first bytes of a later request arrive, and closes
the connection if that request's headers are not complete in time. Idle keep-alive
connections stay under uvicorn's ``--timeout-keep-alive``; the body has its own deadline in
``GateMiddleware``, and a connection whose request body is still arriving when its response is
complete is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderTimeoutH11Protocol(H11Protocol):
    """``H11Protocol`` that closes connections whose request headers take too long."""

    header_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the first bytes of a new request on this connection
        super().data_received(data)

    def on_response_complete(self) -> None:
        # A client still sending a body we answered without reading (a 401, or a GET with a
        # body) could otherwise trickle bytes forever: each one resets the keep-alive timer.
        if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
            self.transport.close()
            return
        super().on_response_complete()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's headers are complete
            self._cancel_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def protocol_with_header_timeout(seconds: float) -> type[H11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with the given header deadline."""
    attrs = {"header_timeout": seconds}
    return type("HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), attrs)
