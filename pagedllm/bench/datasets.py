"""Benchmark workloads: random token-id prompts and ShareGPT conversations.

Every request carries its prompt as token ids and the exact number of tokens to generate
(benchmarks set ``ignore_eos``), so runs are comparable across engines.

* ``random``: prompt and output lengths are drawn independently and uniformly from inclusive
  ranges: ``[int(len * (1 - r)), int(len * (1 + r))]`` for ``--input-len/--output-len`` and
  ``--range-ratio r`` (as vLLM), or given directly with ``--input-len-range LO:HI`` /
  ``--output-len-range LO:HI`` (nano-vllm's workload is ``101:1023`` for both). Token ids are
  uniform over the tokenizer's vocabulary (capped at the model's), special ids excluded.
* ``sharegpt``: a JSON list of ``{"conversations": [{"from": "human"|"gpt", "value": ...}]}``;
  the prompt is the first human turn, the output length the token count of the first gpt
  reply after it (or a fixed ``--output-len``). Pairs with a prompt or reply under 4 tokens,
  a prompt over 1024 tokens, or more than 2048 tokens in all are skipped (as vLLM does).
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048


@dataclass
class BenchRequest:
    """One benchmark request: prompt token ids and the number of tokens to generate."""

    prompt_token_ids: list[int]
    output_len: int
    prompt: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def parse_len_range(text: str) -> tuple[int, int]:
    """``"LO:HI"`` (or ``"LO,HI"``) -> ``(LO, HI)``, an inclusive range with 1 <= LO <= HI."""
    parts = text.replace(",", ":").split(":")
    if len(parts) != 2:
        raise ValueError(f"A length range is LO:HI, got {text!r}.")
    lo, hi = int(parts[0]), int(parts[1])
    if not 1 <= lo <= hi:
        raise ValueError(f"A length range needs 1 <= LO <= HI, got {text!r}.")
    return lo, hi


def ratio_range(length: int, range_ratio: float) -> tuple[int, int]:
    """The inclusive range ``[int(length*(1-r)), int(length*(1+r))]`` (lower end at least 1)."""
    if length < 1:
        raise ValueError(f"Lengths must be >= 1, got {length}.")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--range-ratio must be in [0, 1), got {range_ratio}.")
    lo = max(1, int(length * (1.0 - range_ratio)))
    return lo, max(lo, int(length * (1.0 + range_ratio)))


def special_token_ids(tokenizer: Any) -> set[int]:
    """Every special / added-special id the tokenizer knows (BOS, EOS, pad, unk, ...)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) or []}
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            ids.add(value)
    return ids


def sample_random(
    num_requests: int,
    input_range: tuple[int, int],
    output_range: tuple[int, int],
    vocab_size: int,
    excluded_ids: Sequence[int] | set[int] = (),
    seed: int = 0,
) -> list[BenchRequest]:
    """``num_requests`` prompts of random ids in ``[0, vocab_size)`` minus ``excluded_ids``."""
    if num_requests < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {num_requests}.")
    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(sorted(excluded_ids), dtype=np.int64))
    if allowed.size == 0:
        raise ValueError("No token ids left to sample prompts from.")
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(input_range[0], input_range[1] + 1, size=num_requests)
    out_lens = rng.integers(output_range[0], output_range[1] + 1, size=num_requests)
    return [
        BenchRequest(allowed[rng.integers(0, allowed.size, size=int(n))].tolist(), int(m))
        for n, m in zip(in_lens, out_lens, strict=True)
    ]


def _first_pair(conversation: list[dict[str, Any]]) -> tuple[str, str] | None:
    """The first human turn and the first gpt reply after it."""
    prompt: str | None = None
    for turn in conversation:
        role, value = turn.get("from"), turn.get("value")
        if not isinstance(value, str):
            continue
        if prompt is None and role == "human":
            prompt = value
        elif prompt is not None and role == "gpt":
            return prompt, value
    return None


def sample_sharegpt(
    path: str | Path,
    num_requests: int,
    tokenizer: Any,
    seed: int = 0,
    output_len: int | None = None,
    max_model_len: int | None = None,
) -> list[BenchRequest]:
    """Up to ``num_requests`` (prompt, reply) pairs from a ShareGPT JSON file, shuffled by seed."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"ShareGPT dataset {file} does not exist.")
    data = json.loads(file.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{file}: expected a JSON list of conversations.")
    convs = [d.get("conversations") or [] for d in data if isinstance(d, dict)]
    pairs = [p for p in map(_first_pair, convs) if p is not None]
    random.Random(seed).shuffle(pairs)
    max_total = min(SHAREGPT_MAX_TOTAL_LEN, max_model_len or SHAREGPT_MAX_TOTAL_LEN)
    out: list[BenchRequest] = []
    for prompt, reply in pairs:
        if len(out) == num_requests:
            break
        prompt_ids = list(tokenizer(prompt).input_ids)
        reply_len = len(tokenizer(reply, add_special_tokens=False).input_ids)
        n_out = output_len if output_len is not None else reply_len
        if len(prompt_ids) < SHAREGPT_MIN_LEN or (output_len is None and n_out < SHAREGPT_MIN_LEN):
            continue
        if len(prompt_ids) > SHAREGPT_MAX_PROMPT_LEN or len(prompt_ids) + n_out > max_total:
            continue
        out.append(BenchRequest(prompt_ids, n_out, prompt))
    if not out:
        raise ValueError(f"{file}: no usable (human, gpt) pairs within the length limits.")
    if len(out) < num_requests:
        logger.warning("ShareGPT: only %d of %d requested pairs usable.", len(out), num_requests)
    return out


def workload_summary(requests: Sequence[BenchRequest]) -> dict[str, float | int]:
    """Counts and length statistics of a request list (for reports)."""
    ins = np.array([r.prompt_len for r in requests])
    outs = np.array([r.output_len for r in requests])
    return {
        "num_requests": len(requests),
        "total_prompt_tokens": int(ins.sum()),
        "total_output_tokens": int(outs.sum()),
        "input_len_mean": round(float(ins.mean()), 2),
        "input_len_min": int(ins.min()),
        "input_len_max": int(ins.max()),
        "output_len_mean": round(float(outs.mean()), 2),
        "output_len_min": int(outs.min()),
        "output_len_max": int(outs.max()),
    }
