"""Builds a model from an ``EngineConfig`` and fills its weights (safetensors or dummy)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pagedllm.config import EngineConfig
from pagedllm.layers.linear import MergedLinear
from pagedllm.models.registry import get_model_cls

logger = logging.getLogger(__name__)


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({model_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names missing shard files: {', '.join(missing)}.")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"No *.safetensors weights in {model_dir} (pagedllm loads safetensors only; use "
            "load_format='dummy' for random weights)."
        )
    return files


def iter_checkpoint(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in _safetensors_files(model_dir):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into ``model``; fused q/k/v and gate/up load shard by shard."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    packed: dict[str, tuple[str, str]] = getattr(model, "packed_modules", {})
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    loaded: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
            continue
        module_name, _, param_name = name.rpartition(".")
        prefix, _, leaf = module_name.rpartition(".")
        if leaf in packed:
            fused, shard_id = packed[leaf]
            fused_name = f"{prefix}.{fused}"
            module = modules.get(fused_name)
            if not isinstance(module, MergedLinear):
                raise ValueError(f"Checkpoint tensor {name} has no matching fused layer.")
            module.load_shard(param_name, shard_id, tensor)
            loaded.add(f"{fused_name}.{param_name}")
            continue
        if name not in params:
            raise ValueError(f"Checkpoint tensor {name} does not match any model parameter.")
        param = params[name]
        if param.shape != tensor.shape:
            raise ValueError(
                f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}"
            )
        param.data.copy_(tensor)
        loaded.add(name)
    missing = sorted(set(params) - loaded - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise ValueError(f"Checkpoint is missing weights: {', '.join(missing[:8])}.")


def _dummy_init(model: nn.Module, seed: int) -> None:
    """Random weights of the real shapes, drawn on the model's device (fast for 8B models)."""
    for i, (name, param) in enumerate(model.named_parameters()):
        if "norm" in name:
            param.data.fill_(1.0)
            continue
        gen = torch.Generator(device=param.device).manual_seed(seed + i)
        param.data.uniform_(-1e-3, 1e-3, generator=gen)


def load_model(config: EngineConfig) -> nn.Module:
    """Instantiate the model on the target device and dtype and load its weights."""
    cls = get_model_cls(config.model_config)
    assert config.model is not None
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(config.torch_dtype)
    try:
        with torch.device(config.torch_device):
            model = cls(config.model_config)
    finally:
        torch.set_default_dtype(default_dtype)
    if config.load_format == "dummy":
        _dummy_init(model, config.seed)
    else:
        load_weights(model, iter_checkpoint(Path(config.model)))
    # Rotary tables stay fp32 whatever the weights' dtype.
    for module in model.modules():
        for bname, buf in module.named_buffers(recurse=False):
            if bname in ("cos", "sin"):
                setattr(module, bname, buf.float())
    return model.eval()
