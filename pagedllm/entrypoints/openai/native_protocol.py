"""Pydantic models of SGLang's native ``POST /generate`` request, as SGLang's frontend sends it.

SGLang's ``RuntimeEndpoint`` (its frontend language's HTTP backend) talks to a server through
``/generate`` rather than the OpenAI routes: it needs prompt logprobs of arbitrary text for
``select`` and "prefill only" calls to prime the prefix cache. These models accept exactly the
wire format it sends. Types are strict, as on the OpenAI routes. Fields we do not implement are
never silently dropped: ``unsupported_fields`` names every one that carries a value (its clients
send several as ``null``: ``lora_path``, ``session_id``; ``stop_regex`` as ``[]``), and the
route answers 400 naming it.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel

SGLANG_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default when a request names none
_SEED_MAX = 2**63 - 1 - 1024  # seed + choice index must still fit torch's int64 seed


class NativeModel(BaseModel):
    """Strict types; unknown fields are kept in ``model_extra`` to be named in a 400."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class NativeSamplingParams(NativeModel):
    """``sampling_params`` of ``/generate`` (SGLang's names; ``top_k=-1`` means off)."""

    max_new_tokens: int | None = Field(default=None, ge=0)
    min_new_tokens: int = Field(default=0, ge=0)
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = Field(default=None, ge=-_SEED_MAX, le=_SEED_MAX)
    regex: str | None = None
    json_schema: str | None = None
    ebnf: str | None = None


class GenerateRequest(NativeModel):
    """``POST /generate``: ``text`` or ``input_ids``, one prompt or a list of them."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: NativeSamplingParams | None = None
    return_logprob: bool = False
    logprob_start_len: int = Field(default=-1, ge=-1)
    top_logprobs_num: int = Field(default=0, ge=0)
    return_text_in_logprobs: bool = False
    stream: bool = False


def _is_unset(value: Any) -> bool:
    """``null``, ``false``, ``[]`` and ``{}`` ask for nothing (SGLang's clients send these)."""
    return value is None or value is False or value == [] or value == {}


def unsupported_fields(req: GenerateRequest) -> list[str]:
    """Names of the request's fields we do not implement that carry a value."""
    names = [k for k, v in (req.model_extra or {}).items() if not _is_unset(v)]
    sp = req.sampling_params
    if sp is not None:
        extra = sp.model_extra or {}
        names += [f"sampling_params.{k}" for k, v in extra.items() if not _is_unset(v)]
    return names


# ---- answers (documented in the OpenAPI document; the route builds plain dicts) -----------


class FinishReason(BaseModel):
    """``{"type": "stop", "matched"}``, ``{"type": "length", "length"}`` or ``{"type":
    "abort", "message"}``."""

    type: str
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None


class GenerateMetaInfo(BaseModel):
    """Counts, the finish reason and (with ``return_logprob``) logprob entries
    ``[logprob | null, token_id, text | null]``."""

    id: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    finish_reason: FinishReason | None
    input_token_logprobs: list[list[Any]] | None = None
    output_token_logprobs: list[list[Any]] | None = None
    input_top_logprobs: list[list[list[Any]] | None] | None = None
    output_top_logprobs: list[list[list[Any]] | None] | None = None


class GenerateAnswer(BaseModel):
    text: str
    meta_info: GenerateMetaInfo
    index: int | None = None


class GenerateResponse(RootModel[GenerateAnswer | list[GenerateAnswer]]):
    """One answer for one prompt (``n=1``), else a list in request order."""


class ModelInfo(BaseModel):
    model_path: str
    tokenizer_path: str
    is_generation: bool
    served_model_names: list[str]


class ServerInfo(BaseModel):
    version: str
    model_path: str
    served_model_names: list[str]
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int | None
    block_size: int
    enable_prefix_caching: bool
    max_n: int
    max_seqs_per_request: int
