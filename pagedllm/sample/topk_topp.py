"""Truncation of the (temperature-scaled) distribution: min-p, top-k and top-p.

Each function masks dropped tokens to ``-inf`` in a float32 ``[B, V]`` logits tensor (in
place where convenient) and returns the result. All are batched; a row whose setting is
disabled (``min_p == 0``, ``top_k == V``, ``top_p == 1``) is left unchanged, and the most
likely token of every row is always kept.

Tie policy:

* **top-k keeps every token tied with the k-th largest logit** (so a row may keep more than
  ``k`` tokens when there are exact ties at the threshold). This is independent of sort order
  and therefore identical on both code paths below and on every device.
* **top-p** works on a stable ascending sort; tokens tied exactly at the nucleus boundary are
  kept or dropped by their position in that sort (lower token id dropped first).
"""

from __future__ import annotations

import torch

_NEG_INF = float("-inf")


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p * max_prob`` of their row."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return logits.masked_fill_(probs < threshold, _NEG_INF)


def apply_top_k_only(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Top-k without a full sort: one ``topk(max_top_k)`` gives every row's threshold.

    ``top_k`` holds ``V`` for rows where it is disabled; enabled rows have ``k <= max_top_k``.
    """
    v = logits.shape[-1]
    enabled = top_k < v
    kth_index = (top_k.clamp(max=max_top_k) - 1).unsqueeze(1)
    top_values = torch.topk(logits, max_top_k, dim=-1, sorted=True).values
    threshold = top_values.gather(1, kth_index)
    threshold = threshold.masked_fill_(~enabled.unsqueeze(1), _NEG_INF)
    return logits.masked_fill_(logits < threshold, _NEG_INF)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Top-k then top-p on one stable ascending sort of each row.

    Top-p keeps the smallest set of most likely tokens whose mass is ``>= p`` (computed
    after top-k renormalisation): an ascending token is dropped while the cumulative mass of
    it and everything below it is ``<= 1 - p``. The top token is never dropped.
    """
    if top_k is None and top_p is None:
        return logits
    v = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, stable=True)
    if top_k is not None:
        # k-th largest value sits at ascending position V - k; k == V keeps everything.
        threshold = sorted_logits.gather(1, (v - top_k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < threshold, _NEG_INF)
    if top_p is not None:
        cum = torch.softmax(sorted_logits, dim=-1).cumsum_(dim=-1)
        drop = cum <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, _NEG_INF)
    return logits.scatter_(1, order, sorted_logits)
