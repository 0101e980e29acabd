"""`ModelConfig`: which model to run and how its weights are loaded.

The user names a Hugging Face directory; everything the directory itself says (layers, heads,
context limit, the checkpoint's dtype) is read once into ``arch`` (``ArchitectureConfig``).
``max_model_len`` is resolved here against that context limit. ``torch_dtype`` is derived too,
but ``dtype="auto"`` depends on the device, so ``EngineConfig`` resolves it, with
``resolve_torch_dtype``, once both groups exist.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pagedllm.config.architecture import ArchitectureConfig
from pagedllm.config.utils import DTYPE_NAMES, check_choice, config_error, torch_dtype_of

if TYPE_CHECKING:
    import torch

DEMO_MODEL_DIR = Path(__file__).parent.parent / "assets" / "demo-model"

LOAD_FORMATS = ("auto", "safetensors", "dummy")


@dataclass
class ModelConfig:
    """Model: the checkpoint directory, its tokenizer, dtype and context length."""

    model: str | None = field(
        default=None,
        metadata={
            "help": "Hugging Face model directory",
            "default_help": "the bundled demo model",
            "dest": "model_flag",  # `generate` and `serve` also take MODEL as a positional
        },
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "tokenizer directory", "default_help": "the model's directory"},
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "weights and activations; auto: float32 on CPU, on GPU the checkpoint's "
            "float16 / bfloat16 (bfloat16 for float32 checkpoints)",
            "choices": ("auto", *DTYPE_NAMES),
        },
    )
    max_model_len: int | None = field(
        default=None,
        metadata={
            "help": "longest sequence (prompt + output) in tokens",
            "default_help": "the model's context limit, capped by its sliding window",
        },
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "seed of the random weights of --load-format dummy (requests seed their "
            "own sampling)"
        },
    )
    load_format: str = field(
        default="auto",
        metadata={
            "help": "auto / safetensors: the checkpoint's weights; dummy: random weights of "
            "the real shapes (benchmarks)",
            "choices": LOAD_FORMATS,
        },
    )
    # Derived:
    arch: ArchitectureConfig = field(init=False, repr=False)
    # Set by EngineConfig (dtype "auto" depends on the device); None on a ModelConfig alone.
    torch_dtype: torch.dtype = field(init=False, default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.model is None:
            self.model = str(DEMO_MODEL_DIR)
        path = Path(os.path.expanduser(self.model))
        if not path.is_dir():
            raise ValueError(
                f"Model {self.model!r} is not a local directory. pagedllm loads Hugging Face "
                "model directories from disk (config.json, *.safetensors, tokenizer files)."
            )
        self.model = str(path)
        if self.tokenizer is None:
            self.tokenizer = self.model
        self.arch = ArchitectureConfig.from_dir(path)
        check_choice(self, "dtype")
        limit = self.arch.context_limit
        if self.max_model_len is None:
            self.max_model_len = limit
        elif not 1 <= self.max_model_len <= limit:
            raise config_error(
                f"max_model_len must be in [1, {limit}] (the model's context limit), "
                f"got {self.max_model_len}."
            )
        check_choice(self, "load_format")


def resolve_torch_dtype(dtype: str, hf_dtype: torch.dtype | None, device_type: str) -> torch.dtype:
    """The torch dtype for a ``dtype`` setting on a device of type ``device_type``.

    ``auto``: float32 on CPU (the reference path); on a GPU the checkpoint's dtype, except that
    float32 (or unknown) checkpoints run in bfloat16.
    """
    import torch

    if dtype != "auto":
        return torch_dtype_of(dtype)
    if device_type == "cpu":
        return torch.float32
    return torch.bfloat16 if hf_dtype in (None, torch.float32) else hf_dtype
