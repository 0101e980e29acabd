"""Vectorised batch sampler (vLLM v1 semantics).

Pipeline for one step, on a float32 copy of the model's ``[B, V]`` logits:

1. the active logits processors, in order (``processors.py``): allowed-token mask ->
   min_tokens -> repetition / frequency / presence penalties -> logit_bias;
2. greedy rows take ``argmax`` of the processed logits (done here, before temperature);
3. temperature -> min-p -> top-k -> top-p (greedy rows are neutral for all of these);
4. random rows sample with the exponential race ``argmax(probs / q)``, ``q ~ Exp(1)``:
   unseeded rows draw ``q`` in one batched call, each seeded row draws its own ``q`` from
   its request's ``torch.Generator``, so its tokens do not depend on the rest of the batch.

Fast path. On CUDA steps 2 and 4 take one Triton pass instead (``kernels/sampling.py``: the
Gumbel-max form of the same race, noise from a per-step seed drawn from torch's default
generator) iff no random row uses top-k, top-p, min-p or a seed; ``fast_path_rows`` gives
the same rule per row. Active processors do not leave the fast path: they edit an fp32 copy
of the logits first (a grammar mask or one penalized row costs that copy and the stage, not
the four extra passes over the batch's logits of the torch path). The decision is for the
whole batch, never split by row: the kernel cannot draw from a row's ``torch.Generator`` (so
seeded rows must stay on the torch path to keep their streams), and routing only some
unseeded rows through it would change which default-generator numbers every other row draws,
so tokens under a fixed ``torch.manual_seed`` would no longer match the unsplit sampler.

Logprobs (``compute_logprobs``) always come from the *raw* logits: ``log_softmax`` in fp32
of the model output before any of the steps above, as vLLM v1 does by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pagedllm.layers.fused import use_fused
from pagedllm.sample.metadata import SamplingMetadata
from pagedllm.sample.processors import LogitsProcessor, active_processors, default_processors
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
    """Whole-batch fast-path rule (host flags only): every random row temperature-only and
    unseeded; ``fast_path_rows(meta).all()`` on the device agrees."""
    return (
        meta.no_top_k
        and meta.no_top_p
        and meta.no_min_p
        and not meta.generators
        and use_fused(logits)
    )


def fast_path_rows(meta: SamplingMetadata) -> torch.Tensor:
    """``[B]`` bool: rows the one-pass kernel could sample exactly as they ask (no top-k /
    top-p / min-p, no seed; greedy rows always). Diagnostic: the sampler itself only takes
    the fast path for a whole batch."""
    v = meta.vocab_size
    ok = torch.ones_like(meta.greedy_mask)
    if meta.top_k is not None:
        ok &= meta.top_k >= v
    if meta.top_p is not None:
        ok &= meta.top_p >= 1.0
    if meta.min_p is not None:
        ok &= meta.min_p <= 0.0
    if meta.generators:
        ok[list(meta.generators)] = False
    return ok


def _sample_fused(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Steps 2 and 4 in one Triton pass (greedy rows: argmax; others: Gumbel-max)."""
    from pagedllm.kernels.sampling import gumbel_sample

    seed = 0 if meta.all_greedy else int(torch.randint(0, 2**31 - 1, (1,)).item())
    return gumbel_sample(logits.float(), meta.temperature, meta.greedy_mask, seed)


def _sample(
    logits: torch.Tensor, meta: SamplingMetadata, active: Sequence[LogitsProcessor]
) -> torch.Tensor:
    """Steps 1-4 of the module docstring in torch ops; ``logits`` itself is left untouched."""
    modifies = bool(active) or not meta.all_greedy
    # Own fp32 copy when we will edit the logits; the raw ones are kept for logprobs.
    x = logits.to(torch.float32, copy=True) if modifies else logits.float()
    for processor in active:
        x = processor.apply(x, meta)

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
    """Turns one step's ``[B, V]`` logits into sampled tokens (+ optional logprobs).

    ``processors`` is the ordered logits-processor list (default: ``default_processors()``);
    each step runs only the ones whose ``is_active`` says this batch needs them.
    """

    def __init__(self, processors: Sequence[LogitsProcessor] | None = None) -> None:
        super().__init__()
        self.processors: tuple[LogitsProcessor, ...] = tuple(
            default_processors() if processors is None else processors
        )

    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        if logits.shape[-1] != meta.vocab_size:
            raise ValueError(
                f"logits have {logits.shape[-1]} columns but metadata was built for "
                f"vocab_size={meta.vocab_size}"
            )
        if logits.shape[0] != meta.batch_size:
            raise ValueError(
                f"logits have {logits.shape[0]} rows but metadata was built for "
                f"{meta.batch_size} sampling rows"
            )
        active = active_processors(self.processors, meta)
        if _gumbel_ok(logits, meta):
            x = logits
            if active:  # the processors edit an fp32 copy; the raw logits stay for logprobs
                x = logits.to(torch.float32, copy=True)
                for processor in active:
                    x = processor.apply(x, meta)
            sampled = _sample_fused(x, meta)
        else:
            sampled = _sample(logits, meta, active)
        if meta.max_num_logprobs is None:
            return SamplerOutput(sampled, None, None, None)
        ids, lps, ranks = compute_logprobs(logits, sampled, meta.max_num_logprobs)
        return SamplerOutput(sampled, ids, lps, ranks)
