"""`InputProcessor`: a request's prompt turned into token ids and checked against the engine.

A request can enter at three doors: ``LLM.generate`` (offline), ``AsyncLLM.generate`` (the API
process, which checks before sending so that a bad request costs no round trip) and
``LLMEngine.add_request`` (the engine, which checks again whatever it is sent). All three hold
an ``InputProcessor`` built from the same config and tokenizer, so every rule a request must
meet against this model and engine is written once, here: a non-empty prompt of token ids in
the vocabulary leaving room for output within ``max_model_len``, logprob counts,
``logit_bias`` and ``allowed_token_ids`` ids within the vocabulary (and ``bad_words`` turned
into token ids), a reachable ``min_tokens``, and a priority only under
priority scheduling. A multimodal model's prompt may carry images
(``{"prompt" | "prompt_token_ids": ..., "multi_modal_data": {"image": ...}}``): they are
decoded and checked (count, size, decodable), run through the model's image processor, and
their placeholders expanded (``pagedllm/multimodal/processor.py``); a placeholder token without
an image is refused, and a text-only model refuses images. The OpenAI server reads its limits
from the same object and keeps only its HTTP-specific checks (OpenAI's wording for
context-length errors, request-size bounds).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagedllm.config import EngineConfig
from pagedllm.config.scheduler import encoder_token_budget
from pagedllm.core.scheduler_output import MultiModalFeature
from pagedllm.multimodal.processor import ImageProcessor, is_multimodal, parse_limit_mm_per_prompt
from pagedllm.sampling_params import SamplingParams

# What a prompt can be: text, token ids, or a dict with either and optional images.
PromptInput = str | Sequence[int] | dict[str, Any]
_PROMPT_KEYS = ("prompt", "prompt_token_ids", "multi_modal_data", "mm_features")


@dataclass(frozen=True)
class ProcessedInput:
    """A checked request: its prompt token ids and its effective ``max_tokens`` (the request's,
    capped by the room ``max_model_len`` leaves after the prompt)."""

    prompt_token_ids: list[int]
    max_tokens: int
    mm_features: list[MultiModalFeature] = field(default_factory=list)

    @property
    def engine_prompt(self) -> list[int] | dict[str, Any]:
        """What to hand to another engine's ``add_request`` (the API process sends this):
        the token ids, with the processed images when there are any."""
        if not self.mm_features:
            return self.prompt_token_ids
        return {"prompt_token_ids": self.prompt_token_ids, "mm_features": self.mm_features}


class InputProcessor:
    """Tokenizes and checks requests for one engine (see the module doc).

    ``process(prompt, params, priority)`` does everything; its parts (``tokenize``,
    ``check_priority``, ``check_prompt``) serve callers that must run them at different
    moments (the server checks the priority before it tokenizes). Every check raises ValueError.
    """

    def __init__(self, config: EngineConfig, tokenizer: PreTrainedTokenizerBase) -> None:
        max_model_len = config.model_config.max_model_len
        assert max_model_len is not None  # resolved by the config
        self.config = config
        self.tokenizer = tokenizer
        self.vocab_size: int = config.model_config.arch.vocab_size
        self.max_model_len: int = max_model_len
        self.priority_scheduling = config.scheduler_config.scheduling_policy == "priority"
        sched = config.scheduler_config
        self.max_encoder_tokens = encoder_token_budget(sched)
        self.images: ImageProcessor | None = None
        raw = config.model_config.arch.raw
        if is_multimodal(raw):
            assert config.model_config.model is not None
            limits = parse_limit_mm_per_prompt(sched.limit_mm_per_prompt)
            self.images = ImageProcessor(
                config.model_config.model,
                raw,
                limits.get("image"),
                sched.allowed_local_media_path,
            )

    def process(
        self, prompt: PromptInput, params: SamplingParams, priority: int = 0
    ) -> ProcessedInput:
        """Check the priority, tokenize the prompt (and process its images), check the
        request; ValueError if it can't run."""
        self.check_priority(priority)
        prompt_ids, features = self.tokenize_multimodal(prompt)
        max_tokens = self.check_prompt(prompt_ids, params)
        params._bad_words_token_ids = self.bad_word_token_ids(params.bad_words or [])
        return ProcessedInput(prompt_ids, max_tokens, features)

    def tokenize_multimodal(self, prompt: PromptInput) -> tuple[list[int], list[MultiModalFeature]]:
        """Token ids (image placeholders expanded) and image features of any prompt form."""
        images: Any = None
        features: list[MultiModalFeature] | None = None
        if isinstance(prompt, dict):
            unknown = sorted(set(prompt) - set(_PROMPT_KEYS))
            if unknown:
                raise ValueError(
                    f"Unknown prompt keys {unknown}; a prompt dict takes {list(_PROMPT_KEYS)}."
                )
            if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
                raise ValueError("A prompt dict needs exactly one of 'prompt', 'prompt_token_ids'.")
            mm = prompt.get("multi_modal_data")
            if mm is not None:
                if not isinstance(mm, dict) or sorted(mm) != ["image"]:
                    got = sorted(mm) if isinstance(mm, dict) else type(mm).__name__
                    raise ValueError(f"multi_modal_data takes only 'image' (got {got}).")
                images = mm["image"]
            features = prompt.get("mm_features")
            text = prompt.get("prompt", prompt.get("prompt_token_ids"))
            prompt_ids = self.tokenize(text)  # type: ignore[arg-type]
        else:
            prompt_ids = self.tokenize(prompt)
        if self.images is None:
            if images is not None or features:
                arch = self.config.model_config.arch.architecture
                raise ValueError(f"Model {arch} does not take images (it is text-only).")
            return prompt_ids, []
        if features is not None:  # processed by another InputProcessor (the API process)
            if images is not None:
                raise ValueError("Pass either multi_modal_data or mm_features, not both.")
            self.images.check_features(prompt_ids, features)
            return prompt_ids, list(features)
        features = self.images.features(self.images.load_images(images)) if images else []
        for i, f in enumerate(features):
            if f.length > self.max_encoder_tokens:
                raise ValueError(
                    f"Image {i} needs {f.length} encoder tokens, more than "
                    f"max_num_encoder_tokens ({self.max_encoder_tokens}); send a smaller image "
                    "or raise --max-num-encoder-tokens."
                )
        return self.images.expand(prompt_ids, features), features

    def bad_word_token_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word's token ids as written and after a space (the two ways a word
        usually appears mid-text), without repeats."""
        out: list[list[int]] = []
        for word in words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = list(self.tokenizer.encode(text, add_special_tokens=False))
                if ids and ids not in out:
                    out.append(ids)
        return out

    def tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a text prompt (special tokens such as BOS added), or the given ids."""
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        return [int(t) for t in prompt]

    def in_vocab(self, token_ids: Iterable[int]) -> bool:
        """Whether every id is a token of the model (in ``[0, vocab_size)``)."""
        return all(0 <= t < self.vocab_size for t in token_ids)

    def check_priority(self, priority: int) -> None:
        """Raise ValueError for a nonzero priority unless priority scheduling is on.

        Under ``fcfs`` the scheduler ignores priorities, so accepting one would silently
        promise an ordering the engine does not give.
        """
        if priority != 0 and not self.priority_scheduling:
            raise ValueError(
                f"Got priority {priority} but priority scheduling is not enabled "
                "(--scheduling-policy priority)."
            )

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> int:
        """Raise ValueError if the request can't run; return its effective max_tokens."""
        vocab, max_len = self.vocab_size, self.max_model_len
        if not prompt_ids:
            raise ValueError("The prompt is empty; at least one prompt token is required.")
        if not self.in_vocab(prompt_ids):
            raise ValueError(f"Prompt token ids must be in [0, {vocab}) (the model's vocab size).")
        if len(prompt_ids) >= max_len:
            raise ValueError(
                f"The prompt has {len(prompt_ids)} tokens, but max_model_len is {max_len}: "
                f"prompts may have at most {max_len - 1} tokens to leave room for output."
            )
        if params.prompt_logprobs_start >= len(prompt_ids):
            raise ValueError(
                f"prompt_logprobs_start ({params.prompt_logprobs_start}) must be below the "
                f"prompt's length ({len(prompt_ids)})."
            )
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > vocab:
                raise ValueError(f"{name}={k} exceeds the vocabulary size ({vocab}).")
        if not self.in_vocab(params.logit_bias or {}):
            raise ValueError(
                f"logit_bias token ids must be in [0, {vocab}) (the model's vocab size)."
            )
        if not self.in_vocab(params.allowed_token_ids or []):
            raise ValueError(f"allowed_token_ids must be in [0, {vocab}) (the model's vocab size).")
        room = max_len - len(prompt_ids)
        if params.min_tokens > room:
            raise ValueError(
                f"min_tokens={params.min_tokens} cannot be reached: the prompt has "
                f"{len(prompt_ids)} tokens and max_model_len is {max_len}."
            )
        return room if params.max_tokens is None else min(params.max_tokens, room)
