"""Server-wide state and limits shared by the route handlers.

``ServerState`` is built once per app: the engine, served names, metrics, the request limits
from the serve flags, the rate limiter, and the thread pool that templating and tokenization
run in (``--tokenizer-pool-size``), so that one 10 MB prompt cannot stall ``/health`` and every
running stream. Text longer than ``max_model_len`` times the longest vocabulary entry can never
fit, so ``check_text_fits`` refuses it in microseconds, before anything tokenizes it.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from pagedllm.entrypoints.openai.auth import RateLimiter
from pagedllm.entrypoints.openai.errors import bad_request
from pagedllm.entrypoints.openai.metrics import ServerMetrics

if TYPE_CHECKING:
    from pagedllm.engine.async_llm import AsyncLLM

MAX_LOGPROBS = 20  # default of --max-logprobs
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_BAD_WORDS = 128
MAX_BAD_WORD_CHARS = 256
MAX_PROMPTS = 1024


@dataclass
class ServerState:
    """Everything the serving classes need besides the engine; built once per app."""

    engine: AsyncLLM
    served_model_names: list[str]
    metrics: ServerMetrics
    max_n: int = 128
    max_seqs_per_request: int = 1024
    queue_timeout: float | None = None
    request_timeout: float | None = None
    chat_template: str | None = None
    log_requests: bool = True
    rate_limiter: RateLimiter | None = None
    tokenizer_pool_size: int = 4
    enable_auto_tool_choice: bool = False  # tool_choice "auto" (with tool_call_parser)
    tool_call_parser: str | None = None  # a name in tool_parsers.TOOL_PARSERS
    max_logprobs: int = MAX_LOGPROBS  # --max-logprobs; -1: the vocabulary size
    pool: ThreadPoolExecutor = field(init=False)
    max_chars_per_token: int = field(init=False)

    def __post_init__(self) -> None:
        self.pool = ThreadPoolExecutor(self.tokenizer_pool_size, "pagedllm-tokenize")
        vocab = self.engine.tokenizer.get_vocab()
        self.max_chars_per_token = max((len(t) for t in vocab), default=1) or 1

    @property
    def logprobs_limit(self) -> int:
        """Most logprobs (top alternatives) a request may ask for."""
        if self.max_logprobs < 0:
            return int(self.engine.input_processor.vocab_size)
        return self.max_logprobs

    @property
    def max_model_len(self) -> int:
        return self.engine.input_processor.max_model_len

    @property
    def max_prompt_chars(self) -> int:
        """More characters than this can never fit in ``max_model_len`` tokens."""
        return self.max_model_len * self.max_chars_per_token

    def check_text_fits(self, num_chars: int, param: str) -> None:
        """400 in microseconds for text too long to fit, before anything tokenizes it."""
        if num_chars > self.max_prompt_chars:
            raise bad_request(
                f"The {param} has {num_chars} characters; it cannot fit in this model's maximum "
                f"context length of {self.max_model_len} tokens (at most "
                f"{self.max_chars_per_token} characters per token).",
                param,
                "context_length_exceeded",
            )


def check_unicode(text: str, param: str) -> None:
    """400 for text that is not valid Unicode (a lone UTF-16 surrogate such as ``\\ud800``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise bad_request(
            f"The {param} is not valid Unicode: {e.reason} at character {e.start} "
            f"({text[e.start]!r}).",
            param,
        ) from None


def rate_subject(raw: Request) -> str | None:
    """Whose rate limits ``raw`` counts against (set by the gate middleware; None when no
    limits are configured)."""
    return getattr(raw.state, "rate_subject", None)


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"
