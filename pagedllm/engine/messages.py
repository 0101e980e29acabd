"""Messages between the API process (``AsyncLLM``) and the engine process (``core_proc``).

Plain dataclasses, pickled whole (one zmq frame per message). The API process sends
``AddRequest`` / ``AbortRequests`` / ``Shutdown``; the engine process answers with ``EngineReady``
once the model is loaded, one ``EngineOutputs`` per step (every request's output of that step
plus the engine stats), ``Heartbeat`` while it is idle (so that silence means "stuck", never
"nothing to do"), ``RequestError`` when one request is rejected, and ``EngineError`` just
before it exits on a fatal error.

Every frame is signed: ``encode`` prefixes the pickle with a keyed BLAKE2b MAC and ``decode``
checks it before unpickling. The sockets live in Linux's abstract namespace, which has no file
permissions: any local user could connect to them, and unpickling their bytes would run their
code. The key is random per engine and travels only through the "spawn" start-up pipe.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import secrets
from dataclasses import dataclass, field
from typing import Any

from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams


# ---- API process -> engine process ----------------------------------------------------------
@dataclass
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int = 0


@dataclass
class AbortRequests:
    request_ids: list[str]


@dataclass
class Shutdown:
    pass


# ---- engine process -> API process ----------------------------------------------------------
@dataclass
class EngineReady:
    pid: int
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class EngineOutputs:
    """Everything one ``step()`` produced. ``prompt`` / ``prompt_token_ids`` of each output are
    stripped (the API process knows them) to keep the message small."""

    outputs: list[RequestOutput]
    stats: dict[str, float]


@dataclass
class Heartbeat:
    """Sent by an idle engine every ``core_proc.HEARTBEAT_INTERVAL_S`` (a busy one sends
    ``EngineOutputs`` every step instead). ``stats`` only when they changed since the engine's
    last message (e.g. a request was rejected or aborted while idle), else None: tiny."""

    stats: dict[str, float] | None = None


@dataclass
class RequestError:
    """The engine rejected one request; nothing of it stays queued. Others are unaffected."""

    request_id: str
    error_type: str  # "ValueError" is re-raised as ValueError, anything else as RuntimeError
    message: str


@dataclass
class EngineError:
    """A fatal error: the engine process reports it and exits."""

    message: str
    traceback: str = ""


# ---- framing ---------------------------------------------------------------------------------
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
