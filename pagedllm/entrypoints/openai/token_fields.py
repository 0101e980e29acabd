"""Checks of the request fields that name tokens or text the sampler acts on: ``stop``,
``stop_token_ids``, ``logit_bias``, and vLLM's ``allowed_token_ids`` and ``bad_words``. Each
problem is a 400 naming its field, before anything reaches the engine (which checks the ids
against the vocabulary again, and tokenizes ``bad_words``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedllm.entrypoints.openai.errors import bad_request
from pagedllm.entrypoints.openai.protocol import SamplingFields
from pagedllm.entrypoints.openai.server_state import (
    MAX_BAD_WORD_CHARS,
    MAX_BAD_WORDS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    check_unicode,
)

if TYPE_CHECKING:
    from pagedllm.engine.input_processing import InputProcessor


def check_token_fields(req: SamplingFields, processor: InputProcessor) -> None:
    """400 naming the first of the fields above that is malformed or out of bounds."""
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"At most {MAX_STOP_STRINGS} stop strings are allowed.", "stop")
    for s in stops:
        if not s or len(s) > MAX_STOP_STRING_CHARS:
            raise bad_request(
                f"Stop strings must be 1 to {MAX_STOP_STRING_CHARS} characters long.", "stop"
            )
        check_unicode(s, "stop")
    vocab = processor.vocab_size
    ids = req.stop_token_ids or []
    if len(ids) > MAX_STOP_TOKEN_IDS or not processor.in_vocab(ids):
        raise bad_request(
            f"stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, each in [0, {vocab}).",
            "stop_token_ids",
        )
    allowed = req.allowed_token_ids
    if allowed is not None and (not allowed or not processor.in_vocab(allowed)):
        raise bad_request(
            f"allowed_token_ids must be a non-empty list of token ids in [0, {vocab}).",
            "allowed_token_ids",
        )
    words = req.bad_words or []
    if len(words) > MAX_BAD_WORDS:
        raise bad_request(f"At most {MAX_BAD_WORDS} bad_words are allowed.", "bad_words")
    for w in words:
        if not w.strip() or len(w) > MAX_BAD_WORD_CHARS:
            raise bad_request(
                f"bad_words must be 1 to {MAX_BAD_WORD_CHARS} characters long and not blank.",
                "bad_words",
            )
        check_unicode(w, "bad_words")


def logit_bias_ids(bias: dict[str, float] | None, vocab: int) -> dict[int, float] | None:
    """OpenAI's ``logit_bias`` (token ids as JSON object keys) with integer keys; a 400 naming
    ``logit_bias`` for a key that is not a token id or a bias outside [-100, 100]."""
    if not bias:
        return None
    out: dict[int, float] = {}
    for key, value in bias.items():
        if not key.isdigit() or int(key) >= vocab:
            raise bad_request(
                f"logit_bias keys must be token ids in [0, {vocab}), got {key!r}.", "logit_bias"
            )
        if not -100.0 <= value <= 100.0:
            raise bad_request(
                f"logit_bias[{key}] must be in [-100, 100], got {value}.", "logit_bias"
            )
        out[int(key)] = value
    return out
