"""GGUF files (llama.cpp's single-file format) as Hugging Face model directories.

``pagedllm serve model.gguf``: the file carries the architecture numbers, the tokenizer and the
(quantized) tensors. :func:`gguf_model_dir` turns the metadata into a directory the rest of the
engine reads like any checkpoint (``config.json`` written here from the ``<arch>.*`` keys; the
tokenizer files converted by transformers from ``tokenizer.ggml.*``; ``generation_config.json``
with the file's BOS / EOS), cached per file under ``$PAGEDLLM_CACHE`` (default
``~/.cache/pagedllm``) / ``gguf``. The weights stay in the GGUF: :func:`iter_gguf_weights`
reads them with the ``gguf`` package, dequantizes every type it knows (Q4_0, Q4_1, Q8_0, the
K-quants, F16, F32, ...) to fp32 at load, renames them to Hugging Face names and undoes the
row permutation that llama.cpp's converter applies to Llama q / k projections (it interleaves
the two rotary halves of each head; pagedllm's rotary, like transformers', wants them apart).

Nothing here imports torch at module level: ``config/model.py`` calls :func:`gguf_model_dir`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# GGUF general.architecture -> (Hugging Face class, model_type, q/k rows permuted by llama.cpp).
ARCHITECTURES: dict[str, tuple[str, str, bool]] = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
}

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
_CACHE_VERSION = "1"


def _reader(path: Path) -> Any:
    import gguf

    return gguf.GGUFReader(str(path))


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _architecture(reader: Any, path: Path) -> str:
    arch = str(_field(reader, "general.architecture", ""))
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{path} is a GGUF of architecture {arch!r}; pagedllm reads GGUF files of "
            f"{', '.join(sorted(ARCHITECTURES))}."
        )
    return arch


def hf_config(reader: Any, path: Path) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict from the GGUF metadata of ``reader``."""
    arch = _architecture(reader, path)
    cls, model_type, _ = ARCHITECTURES[arch]

    def key(name: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{name}", default)

    scaling = key("rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{path}: rope scaling {scaling!r} in a GGUF file is not supported")
    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    return {
        "architectures": [cls],
        "model_type": model_type,
        "vocab_size": int(key("vocab_size", len(tokens) if tokens is not None else 0)),
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(key("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }


def _cache_root() -> Path:
    root = os.environ.get("PAGEDLLM_CACHE") or os.path.join("~", ".cache", "pagedllm")
    return Path(os.path.expanduser(root)) / "gguf"


def gguf_model_dir(path: Path) -> Path:
    """The (cached) Hugging Face style directory of GGUF file ``path`` (module doc)."""
    path = path.resolve()
    stat = path.stat()
    key = f"{_CACHE_VERSION}:{path}:{stat.st_size}:{stat.st_mtime_ns}"
    out = _cache_root() / hashlib.sha256(key.encode()).hexdigest()[:24]
    if (out / "config.json").is_file():
        return out
    reader = _reader(path)
    config = hf_config(reader, path)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.save_pretrained(str(tmp))
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config[k] is not None}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (tmp / "gguf_source.json").write_text(json.dumps({"gguf_file": str(path)}) + "\n")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # written last
    try:
        tmp.rename(out)
    except OSError:  # another process converted it first
        if not (out / "config.json").is_file():
            raise
    return out


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

    reader = _reader(path)
    arch = _architecture(reader, path)
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
