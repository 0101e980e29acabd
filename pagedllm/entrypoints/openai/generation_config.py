"""``--generation-config auto|vllm|DIR`` and ``--override-generation-config JSON`` of ``serve``.

A model's ``generation_config.json`` carries its authors' sampling defaults (Qwen2.5: a
temperature of 0.7, top_p 0.8, ...). The server applies them to every request that leaves a
parameter unset. As in vLLM: ``auto`` (the default) takes them from the model's directory,
``vllm`` ignores them (neutral sampling: temperature 1, top_p 1, ...), a directory takes them
from that directory's ``generation_config.json``, and ``--override-generation-config`` sets
individual defaults over whichever source was picked. Only the sampling defaults the server
reads are accepted (temperature, top_p, top_k, min_p, repetition_penalty); any other key is an
error naming it. The end-of-sequence ids stay the model's own.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedllm.engine.async_llm import AsyncLLM

SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def add_generation_config_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--generation-config",
        default="auto",
        metavar="auto|vllm|DIR",
        help="default sampling parameters: auto: the model's generation_config.json; vllm: "
        "none (neutral sampling); DIR: that directory's generation_config.json",
    )
    group.add_argument(
        "--override-generation-config",
        default=None,
        metavar="JSON",
        help="sampling defaults over the --generation-config ones, e.g. '{\"temperature\": 0.5}'",
    )


def _sampling_of(raw: dict[str, Any]) -> dict[str, Any]:
    if not raw.get("do_sample", True):
        return {}
    return {k: raw[k] for k in SAMPLING_KEYS if raw.get(k) is not None}


def _overrides(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--override-generation-config is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("--override-generation-config must be a JSON object")
    unknown = sorted(set(value) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(
            f"--override-generation-config: unsupported key(s) {', '.join(unknown)}; "
            f"supported: {', '.join(SAMPLING_KEYS)}"
        )
    for key, v in value.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"--override-generation-config: {key} must be a number, got {v!r}")
    return value


def check_generation_config_args(args: argparse.Namespace) -> None:
    """ValueError for a bad source or override (before the model loads)."""
    source = args.generation_config
    if source not in ("auto", "vllm") and not Path(source).expanduser().is_dir():
        raise ValueError(f"--generation-config must be auto, vllm or a directory; got {source!r}")
    _overrides(args.override_generation_config)


def sampling_defaults(args: argparse.Namespace, model_defaults: dict[str, Any]) -> dict[str, Any]:
    """The server's default sampling parameters: ``model_defaults`` (what the model's
    generation_config.json says) replaced or overridden as the two flags ask."""
    source = args.generation_config
    if source == "auto":
        base = dict(model_defaults)
    elif source == "vllm":
        base = {}
    else:
        path = Path(source).expanduser() / "generation_config.json"
        raw = json.loads(path.read_text()) if path.is_file() else {}
        base = _sampling_of(raw)
    return {**base, **_overrides(args.override_generation_config)}


def apply_generation_config(engine: AsyncLLM, args: argparse.Namespace) -> None:
    """Set the defaults the serving code reads (``engine.generation_defaults.sampling``)."""
    defaults = engine.generation_defaults
    defaults.sampling = sampling_defaults(args, defaults.sampling)
