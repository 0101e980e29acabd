"""GGUF files (llama.cpp's single-file format) as Hugging Face model directories.

``pagedllm serve model.gguf``: the file carries the architecture numbers, the tokenizer and the
(quantized) tensors. :func:`gguf_model_dir` turns the metadata into a directory the rest of the
engine reads like any checkpoint (``config.json`` written here from the ``<arch>.*`` keys; the
tokenizer files converted by transformers from ``tokenizer.ggml.*``; ``generation_config.json``
with the file's BOS / EOS), cached per file under ``$PAGEDLLM_CACHE`` (default
``~/.cache/pagedllm``) / ``gguf``. ``ModelConfig`` calls it; the weights are read by
``models/gguf.py``. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

# GGUF general.architecture -> (Hugging Face class, model_type, q/k rows permuted by llama.cpp).
ARCHITECTURES: dict[str, tuple[str, str, bool]] = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
}

_CACHE_VERSION = "1"


def gguf_reader(path: Path) -> Any:
    import gguf

    return gguf.GGUFReader(str(path))


def gguf_field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_architecture(reader: Any, path: Path) -> str:
    arch = str(gguf_field(reader, "general.architecture", ""))
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{path} is a GGUF of architecture {arch!r}; pagedllm reads GGUF files of "
            f"{', '.join(sorted(ARCHITECTURES))}."
        )
    return arch


def hf_config(reader: Any, path: Path) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict from the GGUF metadata of ``reader``."""
    arch = gguf_architecture(reader, path)
    cls, model_type, _ = ARCHITECTURES[arch]

    def key(name: str, default: Any = None) -> Any:
        return gguf_field(reader, f"{arch}.{name}", default)

    scaling = key("rope.scaling.type")
    if scaling not in (None, "none"):
        raise ValueError(f"{path}: rope scaling {scaling!r} in a GGUF file is not supported")
    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
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
        "bos_token_id": gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": gguf_field(reader, "tokenizer.ggml.eos_token_id"),
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
    reader = gguf_reader(path)
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
