"""How messages travel between the API process and the engine process: one pickled message
per zmq frame, signed with a keyed BLAKE2b MAC.

Signing is not optional: the sockets live in Linux's abstract namespace, which has no file
permissions, so any local user can connect to them, and unpickling their bytes would run their
code. ``decode`` checks the MAC before it unpickles anything. The key is random per engine
(``new_key``) and reaches the engine process only through the "spawn" start-up pipe.

``Channel`` wraps one socket with the key, so that neither side can send or read an unsigned
frame by mistake.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import pickle
import secrets
from collections.abc import Iterator
from typing import Any

import zmq

logger = logging.getLogger(__name__)

MAC_SIZE = 32


class BadMessageError(ValueError):
    """A frame whose MAC does not match: not from our peer; it was not unpickled."""


def new_key() -> bytes:
    """A fresh random key for one engine's sockets."""
    return secrets.token_bytes(32)


def _mac(key: bytes, payload: bytes | memoryview) -> bytes:
    return hashlib.blake2b(payload, key=key, digest_size=MAC_SIZE).digest()


def encode(msg: Any, key: bytes) -> bytes:
    payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _mac(key, payload) + payload


def decode(data: bytes, key: bytes) -> Any:
    """Unpickle a frame made by ``encode`` with the same key; raise BadMessageError (without
    unpickling anything) for any other bytes."""
    view = memoryview(data)  # no copy of the payload
    mac, payload = view[:MAC_SIZE], view[MAC_SIZE:]
    if len(mac) != MAC_SIZE or not hmac.compare_digest(mac, _mac(key, payload)):
        raise BadMessageError(f"Dropped a {len(data)}-byte frame that failed authentication.")
    return pickle.loads(payload)


class Channel:
    """One zmq socket with signed frames: ``send`` signs, ``messages`` drops forged frames
    (counted in ``num_rejected`` and logged, sparsely)."""

    def __init__(self, sock: zmq.Socket, key: bytes, send_flags: int = 0) -> None:
        self.sock = sock
        self.key = key
        self.send_flags = send_flags
        self.num_rejected = 0

    def send(self, msg: Any) -> None:
        self.sock.send(encode(msg, self.key), self.send_flags)

    def messages(self) -> Iterator[Any]:
        """Every message available now, without blocking."""
        while True:
            try:
                data = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(data, self.key)
            except BadMessageError as e:
                self.num_rejected += 1
                if self.num_rejected in (1, 10) or self.num_rejected % 1000 == 0:
                    logger.warning("%s (%d so far)", e, self.num_rejected)
                continue
            yield msg
