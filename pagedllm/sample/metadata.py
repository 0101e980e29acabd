"""Per-step sampling metadata: the batch's ``SamplingParams`` turned into device tensors.

``SamplingMetadata.build`` runs once per engine step on the host. It packs every per-row
knob into a ``[B]`` tensor on the logits' device and records batch-wide flags
(``all_greedy``, ``no_penalties``, ``no_top_k`` ...) so the sampler can skip whole stages that
no row uses. Token histories needed by the penalties are packed into right-padded
``[B, L]`` int64 tensors whose padding id is ``vocab_size`` (one past the vocabulary): the
sampler scatters into ``V + 1`` columns and drops the last one, so padding costs nothing.

Rows that are greedy never use temperature / top-k / top-p / min-p / generators, so those
settings are neutralised for them (and ignored when computing the flags).

Inputs of the logits processors (``processors.py``) that most rows leave unset are sparse or
optional so an unused one costs nothing: min_tokens and ``logit_bias`` become (row, token)
coordinate lists, and the allowed-token mask (the grammar hook, given to ``build`` by the
caller for the whole batch) is a packed bitmask (``token_mask.py``) or ``None``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.device_utils import h2d
from pagedllm.sample.token_mask import bitmask_width, pack_token_mask, prepare_allowed_mask
from pagedllm.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One row of logits to sample from (one sequence at its current decode position)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # generated tokens known on the host (penalties read them)
    generator: torch.Generator | None  # set iff params.seed is not None; owned by the worker
    num_output_tokens: int | None = None  # generated so far, incl. in-flight; None: len(above)
    # token id -> additive bias on its logit (OpenAI ``logit_bias``); None / {} = none.
    logit_bias: dict[int, float] | None = None


@dataclass
class SamplingMetadata:
    """Tensors (on the logits' device) and flags describing how to sample one batch.

    Per-row tensors have shape ``[B]``. Disabled settings hold neutral values:
    ``top_k == vocab_size``, ``top_p == 1``, ``min_p == 0``, ``temperature == 1`` (greedy rows).
    Optional tensors are ``None`` when the corresponding ``no_*`` / ``all_greedy`` flag says
    the stage is skipped.
    """

    vocab_size: int
    all_greedy: bool
    all_random: bool
    greedy_mask: torch.Tensor  # [B] bool, True = take argmax
    temperature: torch.Tensor | None  # [B] float32; None if all greedy or all random temps == 1
    top_k: torch.Tensor | None  # [B] int64 in [1, V]; V = disabled; None if no_top_k
    max_top_k: int  # largest enabled top_k in the batch (0 if no_top_k)
    top_p: torch.Tensor | None  # [B] float32; None if no_top_p
    min_p: torch.Tensor | None  # [B] float32; None if no_min_p
    generators: dict[int, torch.Generator]  # row index -> generator (random seeded rows only)
    # Penalties, over the P rows that set one (``penalty_rows``), never the whole batch: one
    # penalized request among hundreds costs its own row's history, not everyone's.
    no_penalties: bool
    has_repetition_penalty: bool
    has_output_penalties: bool  # any presence/frequency penalty
    penalty_rows: torch.Tensor | None  # [P] int64 batch rows with any penalty
    repetition_penalties: torch.Tensor | None  # [P] float32
    presence_penalties: torch.Tensor | None  # [P] float32
    frequency_penalties: torch.Tensor | None  # [P] float32
    prompt_token_ids: torch.Tensor | None  # [P, Lp] int64, padded with vocab_size
    output_token_ids: torch.Tensor | None  # [P, Lo] int64, padded with vocab_size
    # Banned this step (min_tokens' stop ids, the last token of a bad word about to complete):
    # (row, token) coordinates whose logits are forced to -inf.
    banned_rows: torch.Tensor | None  # [M] int64
    banned_tokens: torch.Tensor | None  # [M] int64
    # Logprobs: max `logprobs` requested by any row (None = no row asked).
    max_num_logprobs: int | None
    # Allowed-token mask: [B, ceil(V / 32)] int32, bit t % 32 of word t // 32 set = token t
    # allowed (token_mask.py); None if no row is constrained.
    allowed_token_mask: torch.Tensor | None = None
    # logit_bias: logits[rows[i], tokens[i]] += values[i]; None if no row has a bias.
    logit_bias_rows: torch.Tensor | None = None  # [N] int64
    logit_bias_tokens: torch.Tensor | None = None  # [N] int64
    logit_bias_values: torch.Tensor | None = None  # [N] float32

    @property
    def batch_size(self) -> int:
        return int(self.greedy_mask.shape[0])

    @property
    def no_top_k(self) -> bool:
        return self.top_k is None

    @property
    def no_top_p(self) -> bool:
        return self.top_p is None

    @property
    def no_min_p(self) -> bool:
        return self.min_p is None

    @property
    def no_banned_tokens(self) -> bool:
        return self.banned_rows is None

    @classmethod
    def build(
        cls,
        rows: list[SamplingRow],
        vocab_size: int,
        device: torch.device | str,
        allowed_token_mask: torch.Tensor | None = None,
    ) -> SamplingMetadata:
        """Pack ``rows`` into tensors on ``device`` (one host->device copy per tensor).

        ``allowed_token_mask`` (optional) constrains the batch's rows: ``[B, V]`` bool or
        packed ``[B, ceil(V / 32)]`` int32, see ``token_mask.prepare_allowed_mask``.

        Raises:
            ValueError: a row's mask allows no token, or a ``logit_bias`` names a token
                outside ``[0, vocab_size)`` or a non-finite bias.
        """
        device = torch.device(device)
        v = vocab_size
        greedy = [r.params.greedy for r in rows]
        random_rows = [r for r, g in zip(rows, greedy, strict=True) if not g]
        all_greedy = not random_rows
        all_random = not any(greedy)

        def f32(values: list[float]) -> torch.Tensor:
            return h2d(values, torch.float32, device)

        temps = [1.0 if g else r.params.temperature for r, g in zip(rows, greedy, strict=True)]
        temperature = None if all(t == 1.0 for t in temps) else f32(temps)

        ks = [
            v if g or not 0 < r.params.top_k < v else r.params.top_k
            for r, g in zip(rows, greedy, strict=True)
        ]
        enabled_ks = [k for k in ks if k < v]
        top_k = h2d(ks, torch.int64, device) if enabled_ks else None

        ps = [1.0 if g else r.params.top_p for r, g in zip(rows, greedy, strict=True)]
        top_p = f32(ps) if any(p < 1.0 for p in ps) else None

        mps = [0.0 if g else r.params.min_p for r, g in zip(rows, greedy, strict=True)]
        min_p = f32(mps) if any(m > 0.0 for m in mps) else None

        generators = {
            i: r.generator
            for i, (r, g) in enumerate(zip(rows, greedy, strict=True))
            if not g and r.generator is not None
        }

        pen_idx = [i for i, r in enumerate(rows) if r.params.has_penalties]
        pen = [rows[i] for i in pen_idx]
        reps = [r.params.repetition_penalty for r in pen]
        pres = [r.params.presence_penalty for r in pen]
        freqs = [r.params.frequency_penalty for r in pen]
        has_rep = any(x != 1.0 for x in reps)
        has_out = any(x != 0.0 for x in pres) or any(x != 0.0 for x in freqs)
        history = history_fields(rows, history_rows(rows), v, device)
        allowed_token_mask = _with_allowed_ids(allowed_token_mask, rows, v)

        lb_rows, lb_toks, lb_vals = _logit_bias_coords(rows, v)
        has_lb = bool(lb_rows)
        mask = None
        if allowed_token_mask is not None:
            mask = prepare_allowed_mask(allowed_token_mask, len(rows), v, device)

        requested = [r.params.logprobs for r in rows if r.params.logprobs is not None]

        return cls(
            vocab_size=v,
            all_greedy=all_greedy,
            all_random=all_random,
            greedy_mask=h2d(greedy, torch.bool, device),
            temperature=None if all_greedy else temperature,
            top_k=top_k,
            max_top_k=max(enabled_ks, default=0),
            top_p=top_p,
            min_p=min_p,
            generators=generators,
            no_penalties=not pen,
            has_repetition_penalty=has_rep,
            has_output_penalties=has_out,
            penalty_rows=h2d(pen_idx, torch.int64, device) if pen else None,
            repetition_penalties=f32(reps) if has_rep else None,
            presence_penalties=f32(pres) if has_out else None,
            frequency_penalties=f32(freqs) if has_out else None,
            **history,
            max_num_logprobs=max(requested) if requested else None,
            allowed_token_mask=mask,
            logit_bias_rows=h2d(lb_rows, torch.int64, device) if has_lb else None,
            logit_bias_tokens=h2d(lb_toks, torch.int64, device) if has_lb else None,
            logit_bias_values=f32(lb_vals) if has_lb else None,
        )


class SamplingMetadataCache:
    """Reuses the last step's ``SamplingMetadata`` while the batch's rows stay the same.

    In steady decoding most steps sample the same sequences as the step before, and the
    metadata is then identical except for the fields that follow token histories (penalized
    rows' tokens, ``min_tokens`` and bad-word bans): those are rebuilt from their own rows
    only, so one penalized request among hundreds costs its row, not a rebuild of the batch.
    The cache key is the ordered sequence ids plus the very ``SamplingParams`` objects (held
    by the cache, so an id reused by a new request with new settings is never mistaken for
    the old one).
    """

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._ids: list[str] = []
        self._params: list[SamplingParams] = []
        self._meta: SamplingMetadata | None = None
        self._history_rows: list[int] = []  # rows of the cached batch that read their history
        self.hits = 0

    def get(
        self, rows: list[SamplingRow], ids: list[str], allowed_mask: torch.Tensor | None = None
    ) -> SamplingMetadata:
        """The batch's metadata; a grammar's ``allowed_mask`` (new every step) is attached to
        the cached rest rather than rebuilding every per-row tensor around it."""
        if allowed_mask is not None:
            if any(r.params.allowed_token_ids for r in rows):  # the two masks combine: rare
                return SamplingMetadata.build(rows, self.vocab_size, self.device, allowed_mask)
            base = self.get(rows, ids)
            mask = prepare_allowed_mask(allowed_mask, len(rows), self.vocab_size, self.device)
            return dataclasses.replace(base, allowed_token_mask=mask)
        params = [r.params for r in rows]
        meta = self._meta
        if (
            meta is not None
            and ids == self._ids
            and all(a is b for a, b in zip(params, self._params, strict=True))
        ):
            self.hits += 1
            if not self._history_rows:
                return meta
            # Only the history-dependent fields are rebuilt, from their own rows.
            fields = history_fields(rows, self._history_rows, self.vocab_size, self.device)
            return dataclasses.replace(meta, **fields)
        meta = SamplingMetadata.build(rows, self.vocab_size, self.device)
        self._ids, self._params, self._meta = ids, params, meta
        self._history_rows = history_rows(rows)
        return meta


def history_rows(rows: list[SamplingRow]) -> list[int]:
    """Indices of the rows whose metadata changes as they generate (``reads_history``)."""
    return [i for i, r in enumerate(rows) if r.params.reads_history]


def history_fields(
    rows: list[SamplingRow], idx: list[int], vocab_size: int, device: torch.device
) -> dict[str, torch.Tensor | None]:
    """The metadata fields that follow the rows' token histories, from the rows ``idx``
    (``history_rows``): the penalized rows' token ids, and this step's banned tokens
    (``min_tokens``' stop ids, the last token of a bad word about to complete)."""
    v = vocab_size
    pen = [rows[i] for i in idx if rows[i].params.has_penalties]
    has_rep = any(r.params.repetition_penalty != 1.0 for r in pen)
    banned_rows: list[int] = []
    banned_tokens: list[int] = []
    for i in idx:
        r = rows[i]
        done = len(r.output_token_ids) if r.num_output_tokens is None else r.num_output_tokens
        if done < r.params.min_tokens:
            stops = sorted(t for t in r.params.all_stop_token_ids if 0 <= t < v)
            banned_rows.extend([i] * len(stops))
            banned_tokens.extend(stops)
        for word in r.params._bad_words_token_ids if r.params.bad_words else ():
            if _completes(r.output_token_ids, word) and 0 <= word[-1] < v:
                banned_rows.append(i)
                banned_tokens.append(word[-1])
    return {
        "prompt_token_ids": _pad([r.prompt_token_ids for r in pen], v, device) if has_rep else None,
        "output_token_ids": _pad([r.output_token_ids for r in pen], v, device) if pen else None,
        "banned_rows": h2d(banned_rows, torch.int64, device) if banned_rows else None,
        "banned_tokens": h2d(banned_tokens, torch.int64, device) if banned_rows else None,
    }


def _completes(output: list[int], word: list[int]) -> bool:
    """The tokens just generated are ``word`` without its last token."""
    k = len(word) - 1
    return k == 0 or (len(output) >= k and output[-k:] == word[:-1])


def _with_allowed_ids(
    mask: torch.Tensor | None, rows: list[SamplingRow], vocab_size: int
) -> torch.Tensor | None:
    """``mask`` (packed int32 or ``[B, V]`` bool, or None) narrowed by each row's
    ``allowed_token_ids``; ids outside the vocabulary allow nothing. Only the limited rows
    are built, straight into packed words."""
    limited = [(i, r.params.allowed_token_ids) for i, r in enumerate(rows)]
    limited = [(i, ids) for i, ids in limited if ids]
    if not limited:
        return mask
    packed = np.full((len(rows), bitmask_width(vocab_size)), -1, dtype=np.int32)
    for i, ids in limited:
        valid = np.asarray([t for t in ids if 0 <= t < vocab_size], dtype=np.int64)
        words = np.zeros(packed.shape[1], dtype=np.uint32)
        np.bitwise_or.at(words, valid // 32, (1 << (valid % 32)).astype(np.uint32))
        packed[i] = words.view(np.int32)
    narrowed = torch.from_numpy(packed)
    if mask is None:
        return narrowed
    if mask.dtype == torch.bool:
        mask = pack_token_mask(mask.cpu())
    return mask.cpu() & narrowed


def _logit_bias_coords(
    rows: list[SamplingRow], vocab_size: int
) -> tuple[list[int], list[int], list[float]]:
    """(row, token, bias) lists of every non-zero ``logit_bias`` entry, validated."""
    out_rows: list[int] = []
    out_toks: list[int] = []
    out_vals: list[float] = []
    for i, r in enumerate(rows):
        for key, bias in (r.logit_bias or {}).items():
            tok = _token_id(key)
            if tok is None or not 0 <= tok < vocab_size:
                raise ValueError(
                    f"sampling row {i}: logit_bias token id {key!r} is not in [0, {vocab_size})"
                )
            value = _finite(bias)
            if value is None:
                raise ValueError(
                    f"sampling row {i}: logit_bias[{tok}] = {bias!r} is not a finite number"
                )
            if value != 0.0:
                out_rows.append(i)
                out_toks.append(tok)
                out_vals.append(value)
    return out_rows, out_toks, out_vals


def _token_id(key: object) -> int | None:
    """``key`` as a token id (any integer type but bool), else None."""
    if isinstance(key, bool):
        return None
    try:
        return operator.index(key)  # type: ignore[arg-type]
    except TypeError:
        return None


def _finite(value: object) -> float | None:
    """``value`` as a finite float (bool excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value) if math.isfinite(value) else None


def _pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Right-pad token lists into a ``[B, max(1, L)]`` int64 tensor filled with ``pad_id``."""
    width = max(1, max((len(s) for s in seqs), default=0))
    padded = [list(s) + [pad_id] * (width - len(s)) for s in seqs]
    return h2d(padded, torch.int64, device)
