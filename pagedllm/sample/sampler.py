"""Vectorised batch sampler (vLLM v1 semantics).

Pipeline for one step, on a float32 copy of the model's ``[B, V]`` logits:

1. min_tokens: stop ids of rows below ``min_tokens`` -> ``-inf``;
2. repetition / frequency / presence penalties;
3. greedy rows take ``argmax`` of the penalised logits (done here, before temperature);
4. temperature -> min-p -> top-k -> top-p (greedy rows are neutral for all of these);
5. random rows sample with the exponential race ``argmax(probs / q)``, ``q ~ Exp(1)``:
   unseeded rows draw ``q`` in one batched call, each seeded row draws its own ``q`` from
   its request's ``torch.Generator``, so its tokens do not depend on the rest of the batch.

On CUDA, a batch whose random rows use temperature only (no top-k/top-p/min-p, penalties,
min_tokens or seeds), greedy-only batches included, takes one Triton pass instead
(``kernels/sampling.py``: the Gumbel-max form of the same race, noise from a per-step seed
drawn from torch's default generator).

Logprobs (``compute_logprobs``) always come from the *raw* logits: ``log_softmax`` in fp32
of the model output before any of the steps above, as vLLM v1 does by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedllm.layers.fused import use_fused
from pagedllm.sample.metadata import SamplingMetadata
from pagedllm.sample.penalties import apply_min_tokens, apply_penalties
from pagedllm.sample.topk_topp import apply_min_p, apply_top_k_only, apply_top_k_top_p


@dataclass
class SamplerOutput:
    """Result of one sampling step for ``B`` rows."""

    sampled_token_ids: torch.Tensor  # [B] int64
    # [B, 1 + K] int64: col 0 = sampled token, cols 1.. = top-K ids (K = max logprobs
    # requested in the batch); None if no row asked for logprobs.
    logprob_token_ids: torch.Tensor | None
    logprobs: torch.Tensor | None  # [B, 1 + K] float32 matching logprob_token_ids
    sampled_token_ranks: torch.Tensor | None  # [B] int64, 1 = most likely


def compute_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, num_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprobs of ``token_ids`` plus the ``num_top`` most likely alternatives per row.

    Args:
        logits: ``[N, V]`` raw model logits (any float dtype; computed in fp32).
        token_ids: ``[N]`` int64 ids whose logprob/rank are wanted (the sampled tokens, or
            the actual next prompt tokens for prompt logprobs).
        num_top: ``K >= 0`` alternatives to return.

    Returns:
        ``ids [N, 1 + K]`` int64 (col 0 = ``token_ids``, cols 1.. = top-K sorted by
        descending logprob), ``logprobs [N, 1 + K]`` float32 matching ``ids`` and
        ``ranks [N]`` int64. Rank is competition ranking: ``1 + #tokens with a strictly
        greater logprob`` (so every token tied for the maximum has rank 1).
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_ids = token_ids.to(device=logits.device, dtype=torch.int64)
    token_lp = logprobs.gather(1, token_ids.unsqueeze(1))
    ranks = (logprobs > token_lp).sum(dim=-1) + 1
    top_lp, top_ids = torch.topk(logprobs, num_top, dim=-1, sorted=True)
    ids = torch.cat([token_ids.unsqueeze(1), top_ids], dim=1)
    lps = torch.cat([token_lp, top_lp], dim=1)
    return ids, lps, ranks


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Sample one token per row of ``probs`` via ``argmax(probs / q)``, ``q ~ Exp(1)``.

    Rows listed in ``generators`` draw their ``q`` from their own generator (reproducible
    whatever the batch); the rest share one batched draw from the default generator.
    """
    q = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        q.exponential_()
    for i, gen in generators.items():
        q[i].exponential_(generator=gen)
    # q == 0 would give 0/0 = nan for masked tokens, which argmax would pick.
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)


def truncate_and_scale(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Temperature, min-p, top-k and top-p (in that order) for the random rows."""
    if meta.temperature is not None:
        logits = logits.div_(meta.temperature.unsqueeze(1))
    if meta.min_p is not None:
        logits = apply_min_p(logits, meta.min_p)
    if meta.top_p is None and meta.top_k is not None:
        logits = apply_top_k_only(logits, meta.top_k, meta.max_top_k)
    else:
        logits = apply_top_k_top_p(logits, meta.top_k, meta.top_p)
    return logits


def _gumbel_ok(logits: torch.Tensor, meta: SamplingMetadata) -> bool:
    """The one-pass GPU kernel covers greedy and temperature-only random rows."""
    return (
        meta.no_min_tokens
        and meta.no_penalties
        and meta.no_top_k
        and meta.no_top_p
        and meta.no_min_p
        and not meta.generators
        and use_fused(logits)
    )


def _sample_fused(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Steps 3 and 5 in one Triton pass (greedy rows: argmax; others: Gumbel-max)."""
    from pagedllm.kernels.sampling import gumbel_sample

    seed = 0 if meta.all_greedy else int(torch.randint(0, 2**31 - 1, (1,)).item())
    return gumbel_sample(logits.float(), meta.temperature, meta.greedy_mask, seed)


def _sample(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Steps 1-5 of the module docstring in torch ops; ``logits`` itself is left untouched."""
    modifies = not (meta.no_min_tokens and meta.no_penalties and meta.all_greedy)
    # Own fp32 copy when we will edit the logits; the raw ones are kept for logprobs.
    x = logits.to(torch.float32, copy=True) if modifies else logits.float()
    x = apply_min_tokens(x, meta)
    x = apply_penalties(x, meta)

    greedy_tokens = None if meta.all_random else x.argmax(dim=-1)
    if meta.all_greedy:
        assert greedy_tokens is not None
        sampled = greedy_tokens
    else:
        x = truncate_and_scale(x, meta)
        probs = torch.softmax(x, dim=-1)
        sampled = exponential_race(probs, meta.generators)
        if greedy_tokens is not None:
            sampled = torch.where(meta.greedy_mask, greedy_tokens, sampled)
    return sampled


class Sampler(torch.nn.Module):
    """Turns one step's ``[B, V]`` logits into sampled tokens (+ optional logprobs)."""

    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        if logits.shape[-1] != meta.vocab_size:
            raise ValueError(
                f"logits have {logits.shape[-1]} columns but metadata was built for "
                f"vocab_size={meta.vocab_size}"
            )
        sampled = _sample_fused(logits, meta) if _gumbel_ok(logits, meta) else _sample(logits, meta)
        if meta.max_num_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        ids, lps, ranks = compute_logprobs(logits, sampled, meta.max_num_logprobs)
        return SamplerOutput(sampled, ids, lps, ranks)
