"""`SchedulerConfig`: the per-step limits and the order in which requests are served.

The scheduler (``core/scheduler.py``) reads this group, the ``CacheConfig`` and the resolved
``max_model_len``, nothing else. Two of its fields are resolved by ``EngineConfig`` because
they depend on other groups: ``max_num_batched_tokens`` (unset: see
``default_max_num_batched_tokens``, which needs ``max_model_len``) and ``async_scheduling``
(unset: on for CUDA, off for CPU).

Requests with images add two kinds of limits here: the encoder's share of a step
(``max_num_encoder_tokens``, resolved by ``encoder_token_budget``; the scheduler enforces it
and the input processor checks each image against it) and what one request may bring
(``limit_mm_per_prompt``, ``allowed_local_media_path``, checked by the input processor before
anything is queued).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.config.utils import check_at_least, check_choice

SCHEDULING_POLICIES = ("fcfs", "priority")

# Tokens per step with chunked prefill when max_num_batched_tokens is unset, by device type.
# CUDA: measured on an H200 (docs/benchmarks.md): 8192 lets a step carry several prompt chunks
# beside the decodes, which is where large-batch throughput and time to first token come from;
# the GPU is busy enough at that size that decode steps with a chunk are not much slower.
# CPU: small steps keep the tiny-model tests and demos responsive.
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cuda": 8192, "cpu": 2048}


def default_max_num_batched_tokens(
    max_num_seqs: int, max_model_len: int, enable_chunked_prefill: bool, device_type: str = "cpu"
) -> int:
    """The step token budget when none is set: ``DEFAULT_MAX_NUM_BATCHED_TOKENS`` of the device
    type with chunked prefill; without it a whole prompt must fit in one step, so at least
    ``max_model_len``. Never fewer than ``max_num_seqs``, so every running sequence can decode
    each step."""
    if enable_chunked_prefill:
        return max(DEFAULT_MAX_NUM_BATCHED_TOKENS[device_type], max_num_seqs)
    return max(max_model_len, max_num_seqs)


# Unset max_num_encoder_tokens: the step's token budget, but never below this: Qwen2-VL's
# image processor makes at most 16384 embeddings of an image (its default max_pixels), so any
# image it accepts can be encoded.
MIN_DEFAULT_ENCODER_TOKENS = 16384


def encoder_token_budget(config: SchedulerConfig) -> int:
    """Image embeddings (vision-encoder output tokens) one step may compute."""
    if config.max_num_encoder_tokens is not None:
        return config.max_num_encoder_tokens
    assert config.max_num_batched_tokens is not None
    return max(config.max_num_batched_tokens, MIN_DEFAULT_ENCODER_TOKENS)


@dataclass
class SchedulerConfig:
    """Scheduler: batch limits, scheduling policy, chunked prefill and async scheduling."""

    max_num_seqs: int = field(
        default=256, metadata={"help": "most sequences running (holding KV blocks) at once"}
    )
    max_num_batched_tokens: int | None = field(
        default=None,
        metadata={
            "help": "most tokens computed in one step",
            "default_help": f"{DEFAULT_MAX_NUM_BATCHED_TOKENS['cuda']} on CUDA and "
            f"{DEFAULT_MAX_NUM_BATCHED_TOKENS['cpu']} on the CPU with chunked prefill, else "
            "max_model_len; at least max_num_seqs",
        },
    )
    scheduling_policy: str = field(
        default="fcfs",
        metadata={
            "help": "fcfs: arrival order (requests with a priority are rejected); "
            "priority: lower priority value first, then arrival",
            "choices": SCHEDULING_POLICIES,
        },
    )
    enable_chunked_prefill: bool = field(
        default=True,
        metadata={"help": "split long prompts over several steps, beside running decodes"},
    )
    async_scheduling: bool | None = field(
        default=None,
        metadata={
            "help": "schedule step N+1 while step N runs",
            "default_help": "on for CUDA, off for CPU",
        },
    )

    max_num_encoder_tokens: int | None = field(
        default=None,
        metadata={
            "help": "most image embeddings (vision-encoder output tokens) computed in one step; "
            "a prompt chunk that would need more stops before the image",
            "default_help": f"max_num_batched_tokens, at least {MIN_DEFAULT_ENCODER_TOKENS}",
        },
    )
    limit_mm_per_prompt: str | None = field(
        default=None,
        metadata={
            "help": "most items per prompt by modality, as JSON, e.g. '{\"image\": 2}'",
            "default_help": "no limit beyond max_model_len",
        },
    )
    allowed_local_media_path: str | None = field(
        default=None,
        metadata={
            "help": "directory whose files requests may name as file:// image URLs",
            "default_help": "file:// URLs refused",
        },
    )

    def __post_init__(self) -> None:
        check_at_least(self, "max_num_seqs", 1)
        check_at_least(self, "max_num_encoder_tokens", 1)
        if self.limit_mm_per_prompt is not None:
            from pagedllm.multimodal.processor import parse_limit_mm_per_prompt

            parse_limit_mm_per_prompt(self.limit_mm_per_prompt)  # ValueError if malformed
        check_choice(self, "scheduling_policy")
        check_at_least(self, "max_num_batched_tokens", 1)
