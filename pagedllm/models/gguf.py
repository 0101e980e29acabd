"""GGUF weights: read with the ``gguf`` package, dequantized at load, renamed to Hugging Face
names.

:func:`iter_gguf_weights` dequantizes every type the package knows (Q4_0, Q4_1, Q8_0, the
K-quants, F16, F32, ...) to fp32, renames the tensors and undoes the row permutation that
llama.cpp's converter applies to Llama q / k projections (it interleaves the two rotary halves
of each head; pagedllm's rotary, like transformers', wants them apart). The file's metadata
becomes a model directory in ``config/gguf_file.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from pagedllm.config.gguf_file import ARCHITECTURES, gguf_architecture, gguf_reader

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def unpermute_rotary_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q / k permutation: within each head it stores row pairs
    ``(i, i + d/2)`` of the Hugging Face layout next to each other (rows ``2i, 2i + 1``)."""
    rows = w.shape[0]
    half = rows // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def iter_gguf_weights(path: Path, config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of GGUF file ``path`` as (Hugging Face name, fp32 tensor)."""
    import numpy as np
    import torch
    from gguf.quants import dequantize

    reader = gguf_reader(path)
    arch = gguf_architecture(reader, path)
    permuted = ARCHITECTURES[arch][2]
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, path)
        if name is None:
            continue
        data = dequantize(tensor.data, tensor.tensor_type)
        w = torch.from_numpy(np.array(data, dtype=np.float32))  # a copy: the file is mapped
        proj = name.rsplit(".", 2)[-2]
        if permuted and proj in heads and name.endswith((".weight", ".bias")):
            w = unpermute_rotary_rows(w, heads[proj])
        yield name, w


def _hf_name(name: str, path: Path) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name == "rope_freqs.weight":
        raise ValueError(f"{path}: rope_freqs (llama3-style rope scaling) is not supported")
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise ValueError(f"{path}: GGUF tensor {name!r} has no Hugging Face counterpart here")
