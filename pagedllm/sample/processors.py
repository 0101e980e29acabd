"""Logits processors: the ordered stages that edit a batch's logits before sampling.

Every feature that changes *which* tokens may come next, or how likely they are before the
temperature (constraints, stop-token suppression, penalties, biases), is one
``LogitsProcessor``. The sampler runs the active ones in a fixed order on its own fp32 copy of
the logits, then greedy rows take the argmax and random rows go through temperature, min-p,
top-k, top-p and the draw (``sampler.py``). Keeping these stages a list rather than code
inside the sampler gives one place that states their order, lets each say cheaply whether
this batch needs it at all (so an unused feature costs nothing and the one-pass GPU sampler
stays usable), and is where grammar masks and future stages plug in.

Built-in order (``default_processors``):

1. ``AllowedTokenMask``: tokens outside a row's allowed set (``token_mask.py``) -> ``-inf``;
2. ``BannedTokens``: stop / EOS ids of rows below ``min_tokens``, and the last token of a
   bad word about to complete -> ``-inf``;
3. ``Penalties``: repetition, then frequency and presence (``penalties.py``);
4. ``LogitBias``: ``logit += bias`` for each (row, token) of the rows' ``logit_bias``.

Masks come first; as every later stage maps ``-inf`` to ``-inf`` (penalties multiply or
subtract finite amounts, biases are finite), a token masked by 1 or 2 stays banned whatever
follows, and a positive bias cannot bring it back. The bias comes after the penalties, so a
repetition penalty never scales it (vLLM applies it before them; with no penalty set the two
orders agree). If the stages together ban every token of a row (say a grammar allows only
EOS while ``min_tokens`` forbids it), the row is all ``-inf`` and its token is undefined, as
in vLLM; only an empty allowed-token mask is rejected up front.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from pagedllm.sample.metadata import SamplingMetadata
from pagedllm.sample.penalties import apply_banned_tokens, apply_penalties
from pagedllm.sample.token_mask import unpack_token_mask


class LogitsProcessor(ABC):
    """One stage that edits a ``[B, V]`` float32 logits tensor owned by the sampler.

    ``is_active`` must be cheap and host-only (no device synchronisation): it is asked every
    step, and a processor that is inactive is never applied. ``active_rows`` says which rows
    an active processor actually changes; it runs on the device and is meant for per-row
    decisions and diagnostics, not the per-step hot path. ``apply`` may edit ``logits`` in
    place and returns the result, which callers must use (it may be a new tensor).
    """

    name: str = "processor"

    @abstractmethod
    def is_active(self, meta: SamplingMetadata) -> bool:
        """Whether any row of this batch may be changed (False => ``apply`` is skipped)."""

    @abstractmethod
    def active_rows(self, meta: SamplingMetadata) -> torch.Tensor:
        """``[B]`` bool on the metadata's device: rows this processor changes."""

    @abstractmethod
    def apply(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """The adjusted ``logits`` (only called when ``is_active(meta)``)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _rows_mask(meta: SamplingMetadata, rows: torch.Tensor | None) -> torch.Tensor:
    mask = torch.zeros(meta.batch_size, dtype=torch.bool, device=meta.greedy_mask.device)
    return mask if rows is None else mask.index_fill_(0, rows, True)


class AllowedTokenMask(LogitsProcessor):
    """Tokens a row's ``allowed_token_mask`` does not allow get ``-inf`` (grammar hook).

    Unpacks the bitmask with torch ops (an int32 temporary the size of the logits); a fused
    in-place kernel can replace ``apply`` if grammar batches make that temporary matter.
    """

    name = "allowed_token_mask"

    def is_active(self, meta: SamplingMetadata) -> bool:
        return meta.allowed_token_mask is not None

    def active_rows(self, meta: SamplingMetadata) -> torch.Tensor:
        if meta.allowed_token_mask is None:
            return _rows_mask(meta, None)
        return ~unpack_token_mask(meta.allowed_token_mask, meta.vocab_size).all(dim=1)

    def apply(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        assert meta.allowed_token_mask is not None
        allowed = unpack_token_mask(meta.allowed_token_mask, logits.shape[-1])
        return logits.masked_fill_(~allowed, float("-inf"))


class BannedTokens(LogitsProcessor):
    """This step's banned tokens get ``-inf``: stop ids of rows that have not yet produced
    ``min_tokens`` tokens, and the last token of a bad word whose other tokens were just
    generated."""

    name = "banned_tokens"

    def is_active(self, meta: SamplingMetadata) -> bool:
        return not meta.no_banned_tokens

    def active_rows(self, meta: SamplingMetadata) -> torch.Tensor:
        return _rows_mask(meta, meta.banned_rows)

    def apply(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        return apply_banned_tokens(logits, meta)


class Penalties(LogitsProcessor):
    """Repetition, then frequency and presence penalties (``penalties.py``)."""

    name = "penalties"

    def is_active(self, meta: SamplingMetadata) -> bool:
        return not meta.no_penalties

    def active_rows(self, meta: SamplingMetadata) -> torch.Tensor:
        return _rows_mask(meta, meta.penalty_rows)

    def apply(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        return apply_penalties(logits, meta)


class LogitBias(LogitsProcessor):
    """Adds each row's ``logit_bias`` values to the named tokens (a sparse add)."""

    name = "logit_bias"

    def is_active(self, meta: SamplingMetadata) -> bool:
        return meta.logit_bias_rows is not None

    def active_rows(self, meta: SamplingMetadata) -> torch.Tensor:
        return _rows_mask(meta, meta.logit_bias_rows)

    def apply(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        assert meta.logit_bias_tokens is not None and meta.logit_bias_values is not None
        assert meta.logit_bias_rows is not None
        index = (meta.logit_bias_rows, meta.logit_bias_tokens)
        return logits.index_put_(index, meta.logit_bias_values, accumulate=True)


def default_processors() -> list[LogitsProcessor]:
    """The built-in stages in their documented order (module doc)."""
    return [AllowedTokenMask(), BannedTokens(), Penalties(), LogitBias()]


def active_processors(
    processors: Sequence[LogitsProcessor], meta: SamplingMetadata
) -> list[LogitsProcessor]:
    """The processors that apply to this batch, in order."""
    return [p for p in processors if p.is_active(meta)]


def apply_processors(
    logits: torch.Tensor,
    meta: SamplingMetadata,
    processors: Sequence[LogitsProcessor],
) -> torch.Tensor:
    """Run the active ``processors`` in order on ``logits`` (edited in place where possible)."""
    for p in active_processors(processors, meta):
        logits = p.apply(logits, meta)
    return logits
