"""Loads the model's tokenizer, generation defaults (EOS ids, sampling) and chat template."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

_SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass
class GenerationDefaults:
    """What ``generation_config.json`` contributes: EOS ids and default sampling settings."""

    eos_token_ids: set[int] = field(default_factory=set)
    sampling: dict[str, Any] = field(default_factory=dict)


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    p = Path(path)
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise FileNotFoundError(
            f"No tokenizer in {path} (looked for tokenizer.json, tokenizer.model, vocab.json)."
        )
    return AutoTokenizer.from_pretrained(path)


def load_generation_defaults(
    model_dir: str, tokenizer: PreTrainedTokenizerBase
) -> GenerationDefaults:
    out = GenerationDefaults()
    gen_file = Path(model_dir) / "generation_config.json"
    raw: dict[str, Any] = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    eos = raw.get("eos_token_id")
    if eos is None:
        eos = tokenizer.eos_token_id
    if isinstance(eos, int):
        out.eos_token_ids = {eos}
    elif isinstance(eos, list):
        out.eos_token_ids = {int(e) for e in eos}
    if raw.get("do_sample", True):
        out.sampling = {k: raw[k] for k in _SAMPLING_DEFAULT_KEYS if raw.get(k) is not None}
    return out


def apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    tools: list[dict[str, Any]] | None = None,
    no_template_hint: str = "pass chat_template=... or use generate()",
) -> list[int]:
    """Render a conversation (and ``tools``, for templates that describe them) with the
    model's chat template and tokenize it; ValueError, ending with ``no_template_hint``, when
    there is no template."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"This model's tokenizer has no chat template; {no_template_hint}.")
    ids = tokenizer.apply_chat_template(
        messages,
        tools=tools,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=False,
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)
