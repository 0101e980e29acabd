"""Per-request sampling parameters, spelled as vLLM spells them, validated once at creation."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from pagedllm.structured_output.params import StructuredOutputsParams

_GREEDY_EPS = 1e-5


class RequestOutputKind(enum.Enum):
    """What each ``RequestOutput`` of a request carries (as in vLLM)."""

    CUMULATIVE = 0  # everything so far, every step
    DELTA = 1  # only what is new since the last output (streaming)
    FINAL_ONLY = 2  # one output, when the request finishes (offline ``LLM``)


@dataclass
class SamplingParams:
    """How to sample one request's completion(s).

    Field names and meanings follow vLLM / the OpenAI API. ``temperature == 0`` is greedy.
    ``logprobs`` / ``prompt_logprobs`` ask for that many top alternatives per position
    (0 = only the chosen token); ``None`` = no logprobs.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    # Prompt logprobs only from this position on (the entries of prompt tokens 0..start stay
    # None): the prompt before it may then come from the prefix cache (SGLang's
    # ``logprob_start_len``; scoring choices after a long shared context).
    prompt_logprobs_start: int = 0
    # token id -> bias added to its logit before sampling (OpenAI ``logit_bias``).
    logit_bias: dict[int, float] | None = None
    # The output must match a JSON schema, regex, choice or grammar (a dict is converted).
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None
    # Only these token ids may be sampled.
    allowed_token_ids: list[int] | None = None
    # Words never to generate: the last token of a word is banned whenever the tokens before it
    # were just generated (the word is tokenized with and without a leading space).
    bad_words: list[str] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Filled by the engine (not by users): the model's EOS ids from generation_config, and
    # the token sequences of ``bad_words``.
    _all_stop_token_ids: set[int] = field(default_factory=set, repr=False, compare=False)
    _bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        self._validate()
        self._all_stop_token_ids = set(self.stop_token_ids)

    def _validate(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"Invalid SamplingParams: {msg}")

        if not isinstance(self.n, int) or self.n < 1:
            raise bad(f"n must be an integer >= 1, got {self.n!r}.")
        if self.temperature < 0.0:
            raise bad(f"temperature must be >= 0, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise bad(f"top_k must be -1 (disabled), 0 (disabled) or >= 1, got {self.top_k!r}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not self.repetition_penalty > 0.0:
            raise bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}.")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}.")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}.")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens}).")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise bad(f"{name} must be None or an integer >= 0, got {v!r}.")
        start = self.prompt_logprobs_start
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise bad(f"prompt_logprobs_start must be an integer >= 0, got {start!r}.")
        if start and self.prompt_logprobs is None:
            raise bad("prompt_logprobs_start needs prompt_logprobs.")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad(f"seed must be an integer, got {self.seed!r}.")
        assert isinstance(self.stop, list)
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad("stop strings must be non-empty strings.")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids or []):
            raise bad("stop_token_ids must be non-negative integers.")
        for tok, bias in (self.logit_bias or {}).items():
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0:
                raise bad(f"logit_bias keys must be non-negative token ids, got {tok!r}.")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)):
                raise bad(f"logit_bias[{tok}] must be a number, got {bias!r}.")
            if not -100.0 <= bias <= 100.0:
                raise bad(f"logit_bias[{tok}] must be in [-100, 100], got {bias}.")
        if self.allowed_token_ids is not None and (
            not isinstance(self.allowed_token_ids, list)
            or not self.allowed_token_ids
            or any(isinstance(t, bool) or not isinstance(t, int) or t < 0
                   for t in self.allowed_token_ids)
        ):  # fmt: skip
            raise bad("allowed_token_ids must be a non-empty list of non-negative token ids.")
        if self.bad_words is not None and (
            not isinstance(self.bad_words, list)
            or any(not isinstance(w, str) or not w.strip() for w in self.bad_words)
        ):
            raise bad("bad_words must be a list of non-empty strings.")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def update_from_generation_config(self, eos_token_ids: set[int]) -> None:
        """Record the model's EOS ids (stop the request unless ``ignore_eos``)."""
        self._all_stop_token_ids = set(self.stop_token_ids or [])
        if not self.ignore_eos:
            self._all_stop_token_ids |= eos_token_ids

    @property
    def has_penalties(self) -> bool:
        """A repetition, presence or frequency penalty is set."""
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    @property
    def needs_host_tokens(self) -> bool:
        """Sampling reads the values of the sequence's own previous tokens (penalties, bad
        words): with async scheduling such a sequence waits for its last token instead of
        running ahead. (A grammar reads them too, but the engine samples constrained steps
        after the previous step's tokens are in: see ``LLMEngine.step``.)"""
        return self.has_penalties or bool(self.bad_words)

    @property
    def reads_history(self) -> bool:
        """The sampling metadata of this request changes as it generates (penalties, bad
        words, min_tokens), so it cannot be reused from one step to the next."""
        return self.has_penalties or bool(self.bad_words) or self.min_tokens > 0

    @property
    def all_stop_token_ids(self) -> set[int]:
        return self._all_stop_token_ids
