"""Request checks shared by the engine and the API process (which validates before sending)."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from pagedllm.config import EngineConfig
from pagedllm.sampling_params import SamplingParams


def tokenize_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a text prompt (special tokens such as BOS added), or the given ids."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    return [int(t) for t in prompt]


def validate_request(config: EngineConfig, prompt_ids: list[int], params: SamplingParams) -> int:
    """Raise ValueError if the request can't run; return its effective max_tokens."""
    vocab = config.model_config.vocab_size
    max_len = config.max_model_len
    assert max_len is not None
    if not prompt_ids:
        raise ValueError("The prompt is empty; at least one prompt token is required.")
    if any(not 0 <= t < vocab for t in prompt_ids):
        raise ValueError(f"Prompt token ids must be in [0, {vocab}) (the model's vocab size).")
    if len(prompt_ids) >= max_len:
        raise ValueError(
            f"The prompt has {len(prompt_ids)} tokens, but max_model_len is {max_len}: "
            f"prompts may have at most {max_len - 1} tokens to leave room for output."
        )
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(params, name)
        if k is not None and k > vocab:
            raise ValueError(f"{name}={k} exceeds the vocabulary size ({vocab}).")
    if any(not 0 <= t < vocab for t in params.logit_bias or {}):
        raise ValueError(f"logit_bias token ids must be in [0, {vocab}) (the model's vocab size).")
    room = max_len - len(prompt_ids)
    if params.min_tokens > room:
        raise ValueError(
            f"min_tokens={params.min_tokens} cannot be reached: the prompt has "
            f"{len(prompt_ids)} tokens and max_model_len is {max_len}."
        )
    return room if params.max_tokens is None else min(params.max_tokens, room)


def validate_priority(config: EngineConfig, priority: int) -> None:
    """Raise ValueError for a nonzero priority unless priority scheduling is on.

    Under ``fcfs`` the scheduler ignores priorities, so accepting one would silently promise an
    ordering the engine does not give.
    """
    if priority != 0 and config.scheduling_policy != "priority":
        raise ValueError(
            f"Got priority {priority} but priority scheduling is not enabled "
            "(--scheduling-policy priority)."
        )
