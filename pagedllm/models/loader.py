"""Builds a model from an ``EngineConfig`` and fills its weights (safetensors, GGUF or dummy).

The loader knows checkpoint *names*, not layouts: it maps each Hugging Face tensor name to a
model parameter (through the model's ``packed_modules`` for tensors that are parts of a fused
layer, with the part's shard id) and hands the tensor to that parameter's own
``weight_loader``, which knows its slice (fused part, tensor-parallel rank, packed
quantized layout); parameters without one get ``default_weight_loader``. After loading,
each layer's quantization method may post-process its weights. Tensor parallelism and
quantized checkpoints plug in through the layers, not here: the loader hands out
memory-mapped views, so a rank's loaders read only the slices they keep.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from pagedllm.config import EngineConfig
from pagedllm.layers.quantization import get_quant_config
from pagedllm.layers.weight_utils import default_weight_loader
from pagedllm.models.kv_scales import KVScaleCollector
from pagedllm.models.registry import get_model_cls
from pagedllm.models.safetensors_mmap import iter_safetensors_views

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
    """Every tensor of the checkpoint, as a view of its memory-mapped file: a weight loader
    that narrows it to its rank's slice reads only that slice (``safetensors_mmap.py``)."""
    for file in _safetensors_files(model_dir):
        yield from iter_safetensors_views(file)


def _packed_target(
    name: str, packed: dict[str, tuple[str, int | str]]
) -> tuple[str, int | str | None]:
    """(model parameter name, shard id or None) for checkpoint tensor ``name``."""
    module_name, _, param_name = name.rpartition(".")
    prefix, _, leaf = module_name.rpartition(".")
    if leaf in packed:
        fused, shard_id = packed[leaf]
        return f"{prefix}.{fused}.{param_name}" if prefix else f"{fused}.{param_name}", shard_id
    return name, None


def _sources(param: str, packed: dict[str, tuple[str, int | str]]) -> list[str]:
    """The checkpoint tensors that fill model parameter ``param`` (its parts if fused)."""
    module_name, _, param_name = param.rpartition(".")
    prefix, _, leaf = module_name.rpartition(".")
    parts = [part for part, (fused, _) in packed.items() if fused == leaf]
    if not parts:
        return [param]
    return [f"{prefix}.{part}.{param_name}" if prefix else f"{part}.{param_name}" for part in parts]


def load_weights(
    model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]], kv_scales: bool = False
) -> None:
    """Hand every checkpoint tensor to its parameter's ``weight_loader``; check none is missing.

    Skips ``rotary_emb.inv_freq`` buffers and, for tied embeddings, ``lm_head.weight``. A model
    whose checkpoints come in more than one naming layout says how to read them with a
    ``checkpoint_name(name) -> name`` static method (Qwen2-VL: transformers 5's layout).
    KV-cache scales (``models/kv_scales.py``) go to the attention layers when ``kv_scales``
    (an fp8 KV cache) and are skipped with a log line otherwise.
    """
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, int | str]] = getattr(model, "packed_modules", {})
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    scales = KVScaleCollector(model, kv_scales)
    seen: set[str] = set()
    rename = getattr(model, "checkpoint_name", None)
    for name, tensor in weights:
        if rename is not None:
            name = rename(name)
        if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
            continue
        if scales.offer(name, tensor):
            continue
        target, shard_id = _packed_target(name, packed)
        if target not in params:
            via = f" (looked for {target})" if target != name else ""
            raise ValueError(f"Checkpoint tensor {name} does not match any model parameter{via}.")
        param = params[target]
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            if shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
        except ValueError as e:
            raise ValueError(f"Checkpoint tensor {name}: {e}.") from e
        seen.add(name)
    missing = [
        src
        for p, param in params.items()
        if p not in seen and not getattr(param, "optional_in_checkpoint", False)
        for src in _sources(p, packed)
        if src not in seen
    ]
    if missing:
        raise ValueError(f"Checkpoint is missing weights: {', '.join(sorted(missing)[:8])}.")
    scales.apply()


def _dummy_init(model: nn.Module, seed: int) -> None:
    """Random weights of the real shapes, drawn on the model's device (fast for 8B models).

    Parameter i (in ``named_parameters`` order) draws U(-1e-3, 1e-3) from a generator seeded
    with ``seed + i``; norm weights are 1; integer parameters (packed quantized tensors) 0;
    parameters marked ``dummy_keep`` keep the value their layer gave them.
    """
    for i, (name, param) in enumerate(model.named_parameters()):
        if getattr(param, "dummy_keep", False):  # e.g. GPTQ's g_idx: its default is valid
            continue
        if "norm" in name:
            param.data.fill_(1.0)
            continue
        if not param.is_floating_point():
            param.data.zero_()
            continue
        gen = torch.Generator(device=param.device).manual_seed(seed + i)
        param.data.uniform_(-1e-3, 1e-3, generator=gen)


def process_weights_after_loading(model: nn.Module) -> None:
    """Let each layer's quantization method finish its weights (repack, transpose, ...)."""
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)


def load_model(config: EngineConfig) -> nn.Module:
    """Instantiate the model on the target device and dtype and load its weights."""
    mc = config.model_config
    cls = get_model_cls(mc.arch)
    quant_config = get_quant_config(config)
    assert mc.model is not None
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(mc.torch_dtype)
    try:
        with torch.device(config.device_config.torch_device):
            model = cls(mc.arch, quant_config=quant_config)
    finally:
        torch.set_default_dtype(default_dtype)
    if mc.load_format == "dummy":
        _dummy_init(model, mc.seed)
    elif mc.gguf_file is not None:
        from pagedllm.models.gguf import iter_gguf_weights

        load_weights(model, iter_gguf_weights(Path(mc.gguf_file), mc.arch.raw))
    else:
        kv_fp8 = config.cache_config.kv_cache_dtype != "auto"
        load_weights(model, iter_checkpoint(Path(mc.model)), kv_scales=kv_fp8)
    process_weights_after_loading(model)
    # Rotary tables stay fp32 whatever the weights' dtype.
    for module in model.modules():
        for bname, buf in module.named_buffers(recurse=False):
            if bname in ("cos", "sin"):
                setattr(module, bname, buf.float())
    return model.eval()
