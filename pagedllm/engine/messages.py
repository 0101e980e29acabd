"""Messages between the API process (``AsyncLLM``) and the engine process (``core_proc``).

Plain dataclasses, pickled whole, one zmq frame each and signed (see ``framing``). The API
process sends ``AddRequest`` / ``AbortRequests`` / ``Shutdown``; the engine process answers with
``EngineReady`` once the model is loaded, one ``EngineOutputs`` per step (every request's output
of that step plus the engine stats), ``Heartbeat`` while it is idle (so that silence means
"stuck", never "nothing to do"), ``RequestError`` when one request is rejected, and
``EngineError`` just before it exits on a fatal error. The stats travel typed, as a frozen
``stats.EngineStats`` (pickled positionally, ~90 bytes), never as a dict of names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.core.scheduler_output import MultiModalFeature
from pagedllm.engine.stats import EngineStats
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import SamplingParams


# ---- API process -> engine process ----------------------------------------------------------
@dataclass
class AddRequest:
    request_id: str  # the engine's id: unique per ``AsyncLLM.generate`` call, never reused
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int = 0
    # Processed images of a multimodal prompt (their placeholders already expanded).
    mm_features: list[MultiModalFeature] = field(default_factory=list)


@dataclass
class AbortRequests:
    request_ids: list[str]


@dataclass
class Shutdown:
    pass


@dataclass
class ResetPrefixCache:
    """Forget every cached prefix block (allowed only while no request holds blocks); the
    engine answers with ``PrefixCacheReset`` carrying the same ``call_id``."""

    call_id: str


@dataclass
class PrefixCacheReset:
    call_id: str
    ok: bool  # False: requests were running, nothing was dropped


# ---- engine process -> API process ----------------------------------------------------------
@dataclass
class EngineReady:
    """The engine process has loaded the model and serves from now on."""

    pid: int
    stats: EngineStats


@dataclass
class EngineOutputs:
    """Everything one ``step()`` produced. ``prompt`` / ``prompt_token_ids`` of each output are
    stripped (the API process knows them) to keep the message small."""

    outputs: list[RequestOutput]
    stats: EngineStats


@dataclass
class Heartbeat:
    """Sent by an idle engine every ``core_proc.HEARTBEAT_INTERVAL_S`` (a busy one sends
    ``EngineOutputs`` every step instead). ``stats`` only when they changed since the engine's
    last message (e.g. a request was rejected or aborted while idle), else None: tiny."""

    stats: EngineStats | None = None


@dataclass
class RequestError:
    """The engine rejected one request; nothing of it stays queued. Others are unaffected.
    ``error_type`` "ValueError" (sent for any ValueError subclass too: the request's fault, a
    400) is re-raised by ``AsyncLLM`` as ValueError, anything else as RuntimeError."""

    request_id: str
    error_type: str
    message: str


@dataclass
class EngineError:
    """A fatal error: the engine process reports it and exits."""

    message: str
    traceback: str = ""
