"""What the interpreter needs from a backend: generate after a text, score texts, prime the
prefix cache, and the chat template's role text.

Everything else (roles, variables, forks, ``select``'s decision) is the interpreter's, so every
backend runs the same program the same way. Backends are called from many threads at once
(forks, ``run_batch``) and must batch those calls in their engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagedllm.lang.ir import GenParams
from pagedllm.lang.roles import RoleTemplate

OnDelta = Callable[[str], None]


@dataclass
class GenOutput:
    """The generated text and SGLang-style ``meta_info`` (``prompt_tokens``,
    ``completion_tokens``, ``cached_tokens``, ``finish_reason``)."""

    text: str
    meta_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ScoredPrompt:
    """A prompt's token ids and the logprob of each token given those before it (the first
    token has none)."""

    token_ids: list[int]
    logprobs: list[float | None]


class Backend(ABC):
    """A place programs run: the local engine, our server, or an OpenAI-compatible server."""

    #: Whether ``score`` can return prompt logprobs (``select`` needs them).
    can_score: bool = True

    @property
    @abstractmethod
    def role_template(self) -> RoleTemplate: ...

    @abstractmethod
    def generate(self, text: str, params: GenParams, on_delta: OnDelta | None = None) -> GenOutput:
        """Generate after ``text`` (``params`` fully resolved); ``on_delta`` gets each new
        piece of text as it is generated."""

    @abstractmethod
    def score(self, prompts: list[str | list[int]], start: int = 0) -> list[ScoredPrompt]:
        """Token ids and prompt logprobs of each prompt, computed in one batch. Logprobs of
        the tokens at indices up to ``start`` may be None: the engine may take that part of
        each prompt from its prefix cache instead of computing its logits."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """The token ids of a prompt text, as ``generate`` and ``score`` tokenize it."""

    def empty_prompt_ids(self) -> list[int]:
        """What tokenizing an empty text gives (the BOS token, for most models)."""
        return self.tokenize("")

    @abstractmethod
    def cache_prefix(self, text: str) -> None:
        """Compute ``text``'s KV once so that the branches that follow find it cached."""

    def generate_chat(
        self, messages: list[dict[str, str]], params: GenParams, on_delta: OnDelta | None
    ) -> GenOutput:
        """Chat-only backends answer messages instead of text (see ``OpenAIBackend``)."""
        raise NotImplementedError

    #: Whether ``gen`` goes through ``generate_chat`` (the state's messages) instead.
    chat_only: bool = False

    def close(self) -> None:
        """Release what the backend holds (threads, connections)."""
        return None
