"""`LoadConfig`: where a model comes from — a local directory or a Hugging Face hub repository.

Users name models the way every deployment guide does: ``Qwen/Qwen2.5-0.5B-Instruct``. The
settings here say which revision, where the download cache lives and which token opens gated
repositories; ``EngineConfig`` hands them to ``config/hub.py``, which turns a repository id into
a snapshot directory before ``ModelConfig`` (which only reads local directories) is built.
After that the engine sees a plain directory, so the engine process, which rebuilds its config
from ``to_kwargs()``, never downloads anything again.

``trust_remote_code`` is accepted with vLLM's spelling so copied launch commands work, but
pagedllm never imports a repository's Python code: models run on pagedllm's own
implementations (``pagedllm/models``); a checkpoint whose architecture has none is refused by
name, whether or not the flag is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedllm.config.utils import config_error


@dataclass
class LoadConfig:
    """Model source: hub revision, download cache, access token."""

    revision: str | None = field(
        default=None,
        metadata={
            "help": "hub branch, tag or commit of the model",
            "default_help": "the repository's default branch",
        },
    )
    tokenizer_revision: str | None = field(
        default=None,
        metadata={
            "help": "hub branch, tag or commit of the tokenizer",
            "default_help": "--revision when the tokenizer is the model's repository",
        },
    )
    download_dir: str | None = field(
        default=None,
        metadata={
            "help": "Hugging Face cache directory to download models into and load them from",
            "default_help": "the standard cache, $HF_HUB_CACHE or ~/.cache/huggingface/hub",
        },
    )
    hf_token: str | None = field(
        default=None,
        metadata={
            "help": "Hugging Face access token for gated or private repositories",
            "default_help": "$HF_TOKEN or the token saved by `hf auth login`",
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "accepted for vLLM compatibility; pagedllm never runs a repository's own "
            "code, and a model whose architecture pagedllm does not implement is refused by name"
        },
    )

    def __post_init__(self) -> None:
        for name in ("revision", "tokenizer_revision", "download_dir", "hf_token"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise config_error(f"{name} must not be empty.")
