"""Maps a Hugging Face ``architectures`` name to the pagedllm model class."""

from __future__ import annotations

from torch import nn

from pagedllm.config import ArchitectureConfig
from pagedllm.models.llama import LlamaForCausalLM, MistralForCausalLM
from pagedllm.models.qwen import Qwen2ForCausalLM, Qwen3ForCausalLM
from pagedllm.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from pagedllm.models.qwen2_vl import Qwen2VLForConditionalGeneration

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
}


def get_model_cls(cfg: ArchitectureConfig) -> type[nn.Module]:
    if cfg.architecture not in MODEL_REGISTRY:
        raise ValueError(
            f"Model architecture {cfg.architecture!r} is not supported; supported "
            f"architectures: {', '.join(sorted(MODEL_REGISTRY))}."
        )
    return MODEL_REGISTRY[cfg.architecture]
