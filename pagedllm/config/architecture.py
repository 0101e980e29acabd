"""`ArchitectureConfig`: the numbers of a model's architecture, read from its ``config.json``.

They are facts about the checkpoint, not settings: the user picks a model directory
(``ModelConfig.model``) and this is what the directory says. The model code, the KV cache spec
and the request checks read them through ``EngineConfig.model_config.arch``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagedllm.config.utils import DTYPE_NAMES, torch_dtype_of

if TYPE_CHECKING:
    import torch


@dataclass
class ArchitectureConfig:
    """The architecture numbers read from a Hugging Face ``config.json``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    sliding_window: int | None
    hf_dtype: torch.dtype | None
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_dir(cls, path: Path) -> ArchitectureConfig:
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"Model directory {path} has no config.json.")
        raw = json.loads(cfg_file.read_text())
        if isinstance(raw.get("text_config"), dict) and "num_attention_heads" not in raw:
            # A vision-language model in transformers 5's layout: the language model's numbers
            # are in text_config (hub checkpoints have them at the top level).
            raw = {**raw["text_config"], **{k: v for k, v in raw.items() if k != "text_config"}}
        archs = raw.get("architectures") or []
        if not archs:
            raise ValueError(f"{cfg_file} lists no 'architectures'.")
        heads = raw["num_attention_heads"]
        rope_params = raw.get("rope_parameters") or {}
        rope_scaling = raw.get("rope_scaling") or None
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = rope_params
        theta = raw.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        dtype_name = str(raw.get("torch_dtype") or raw.get("dtype"))
        return cls(
            architecture=archs[0],
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            sliding_window=raw.get("sliding_window")
            if raw.get("use_sliding_window", True)
            else None,
            hf_dtype=torch_dtype_of(dtype_name) if dtype_name in DTYPE_NAMES else None,
            raw=raw,
        )

    @property
    def context_limit(self) -> int:
        """The longest sequence the model supports: its position limit, capped by its sliding
        window (there is no sliding-window attention, so sequences stay inside the window)."""
        limit: int = self.max_position_embeddings
        if self.sliding_window:
            limit = min(limit, self.sliding_window)
        return limit
