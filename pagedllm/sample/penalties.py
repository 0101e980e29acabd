"""Logit adjustments that depend on a sequence's token history: banned tokens (min_tokens,
bad words) and penalties.

Functions take a float32 ``[B, V]`` logits tensor (owned by the sampler, so it may be
modified in place) and return the adjusted logits, which callers must use (it may be a new
tensor). Everything is vectorised over the batch (no per-row Python loops).

Penalty semantics (same as vLLM v1):

* ``repetition_penalty`` (HF / CTRL): for every token seen in the prompt *or* the output,
  ``logit / p`` if ``logit > 0`` else ``logit * p``.
* ``frequency_penalty`` / ``presence_penalty`` (OpenAI), over *output* tokens only:
  ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``.

Repetition is applied first, then frequency/presence.
"""

from __future__ import annotations

import torch

from pagedllm.sample.metadata import SamplingMetadata


def apply_banned_tokens(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Forbid this step's banned tokens: stop ids of rows below ``min_tokens``, and the last
    token of each bad word whose other tokens were just generated."""
    if meta.banned_rows is not None:
        assert meta.banned_tokens is not None
        logits[meta.banned_rows, meta.banned_tokens] = float("-inf")
    return logits


def token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-row token histogram ``[B, V]`` (float32) of padded ids (pad id == ``vocab_size``)."""
    b = token_ids.shape[0]
    counts = torch.zeros(b, vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def token_presence(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-row bool mask ``[B, V]`` of which ids occur (pad id == ``vocab_size``)."""
    b = token_ids.shape[0]
    mask = torch.zeros(b, vocab_size + 1, dtype=torch.bool, device=token_ids.device)
    mask.scatter_(1, token_ids, True)
    return mask[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Apply repetition, then frequency and presence penalties (no-op if none is set) to the
    rows that set one (``meta.penalty_rows``); the others are not touched."""
    if meta.no_penalties:
        return logits
    assert meta.penalty_rows is not None
    rows = meta.penalty_rows
    whole = rows.shape[0] == logits.shape[0]  # every row: no gather / scatter needed
    sub = _penalize(logits if whole else logits[rows], meta)
    if whole:
        return sub
    return logits.index_copy_(0, rows, sub)


def _penalize(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Penalties on ``logits`` = the ``[P, V]`` penalty rows, in ``penalty_rows`` order."""
    v = logits.shape[-1]
    assert meta.output_token_ids is not None
    out_counts = token_counts(meta.output_token_ids, v)
    out_seen = out_counts > 0
    if meta.has_repetition_penalty:
        assert meta.prompt_token_ids is not None and meta.repetition_penalties is not None
        seen = token_presence(meta.prompt_token_ids, v) | out_seen
        rep = meta.repetition_penalties.unsqueeze(1).expand_as(logits)
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
    if meta.has_output_penalties:
        assert meta.frequency_penalties is not None and meta.presence_penalties is not None
        freq = meta.frequency_penalties.unsqueeze(1)
        pres = meta.presence_penalties.unsqueeze(1)
        logits = logits - (freq * out_counts + pres * out_seen.float())
    return logits
