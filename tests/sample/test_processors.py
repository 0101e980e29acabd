"""Tests for the logits-processor stages: order, allowed-token masks, logit_bias, skipping and
the fast-path decision (CPU, fast)."""

from __future__ import annotations

import pytest
import torch

import pagedllm.sample.sampler as sampler_mod
from pagedllm.sample.metadata import SamplingMetadata, SamplingRow
from pagedllm.sample.processors import (
    AllowedTokenMask,
    BannedTokens,
    LogitBias,
    LogitsProcessor,
    Penalties,
    active_processors,
    apply_processors,
    default_processors,
)
from pagedllm.sample.sampler import Sampler, fast_path_rows
from pagedllm.sample.token_mask import pack_token_mask, unpack_token_mask
from pagedllm.sampling_params import SamplingParams

V = 32
CPU = torch.device("cpu")
GREEDY = SamplingParams(temperature=0.0)


def row(
    params: SamplingParams | None = None,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    bias: dict[int, float] | None = None,
) -> SamplingRow:
    params = params or SamplingParams()
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    return SamplingRow(params, list(prompt or [1]), list(output or []), gen, logit_bias=bias)


def build(rows: list[SamplingRow], mask: torch.Tensor | None = None, v: int = V):
    return SamplingMetadata.build(rows, v, CPU, allowed_token_mask=mask)


def rand_logits(b: int, v: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


# --------------------------------------------------------------------------- order


def test_default_order_is_documented_one() -> None:
    names = [p.name for p in default_processors()]
    assert names == ["allowed_token_mask", "banned_tokens", "penalties", "logit_bias"]
    assert [p.name for p in Sampler().processors] == names


def test_processors_run_in_order_and_only_when_active(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for cls in (AllowedTokenMask, BannedTokens, Penalties, LogitBias):
        original = cls.apply

        def spy(self, logits, meta, _orig=original):  # type: ignore[no-untyped-def]
            calls.append(self.name)
            return _orig(self, logits, meta)

        monkeypatch.setattr(cls, "apply", spy)
    logits = rand_logits(3)
    plain = [row(), row(GREEDY), row(SamplingParams(top_k=3, seed=1))]
    Sampler()(logits, build(plain))
    assert calls == []  # no row needs any processor: none is applied
    stop = SamplingParams(min_tokens=2, repetition_penalty=1.2)
    stop.update_from_generation_config({0})
    mask = torch.ones(3, V, dtype=torch.bool)
    mask[1, 4] = False
    rows = [row(stop), row(GREEDY, bias={3: 1.0}), row()]
    Sampler()(logits, build(rows, mask))
    assert calls == ["allowed_token_mask", "banned_tokens", "penalties", "logit_bias"]
    calls.clear()
    Sampler()(logits[:2], build([row(GREEDY, bias={3: 1.0}), row()]))
    assert calls == ["logit_bias"]


def test_bias_is_added_after_penalties() -> None:
    logits = torch.zeros(1, V)
    logits[0, 3] = 1.0  # seen in the prompt: repetition penalty 2 halves it
    logits[0, 4] = 3.0
    rows = [row(SamplingParams(temperature=0.0, repetition_penalty=2.0), prompt=[3], bias={3: 3})]
    meta = build(rows)
    out = apply_processors(logits.clone(), meta, default_processors())
    assert out[0, 3] == 3.5  # 1 / 2 + 3; bias first would give (1 + 3) / 2 = 2
    assert Sampler()(logits, meta).sampled_token_ids.item() == 3
    reversed_order = [LogitBias(), Penalties()]
    assert apply_processors(logits.clone(), meta, reversed_order)[0, 3] == 2.0


def test_masked_token_stays_banned_whatever_follows() -> None:
    logits = torch.zeros(2, V)
    logits[:, 5] = 4.0
    mask = torch.ones(2, V, dtype=torch.bool)
    mask[:, 5] = False
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=0.5, presence_penalty=-2.0),
        SamplingParams(frequency_penalty=-2.0),
    ]
    rows = [row(p, prompt=[5], output=[5, 5], bias={5: 100.0}) for p in params]
    meta = build(rows, mask)
    out = apply_processors(logits.clone(), meta, default_processors())
    assert torch.isneginf(out[:, 5]).all()
    assert torch.equal(out[:, :5], logits[:, :5])
    torch.manual_seed(0)
    many = [row(params[1], output=[5], bias={5: 100.0}) for _ in range(300)]
    big_mask = mask[:1].expand(300, V)
    tokens = Sampler()(logits[:1].expand(300, V), build(many, big_mask)).sampled_token_ids
    assert (tokens != 5).all()


# --------------------------------------------------------------------------- allowed-token mask


@pytest.mark.parametrize("packed", [False, True])
def test_mask_forces_greedy_and_random_rows_into_allowed_set(packed: bool) -> None:
    torch.manual_seed(0)
    b = 400
    allowed_ids = [2, 7, 11, 31]
    logits = rand_logits(b, seed=3) / 3
    mask = torch.zeros(b, V, dtype=torch.bool)
    mask[:, allowed_ids] = True
    params = [GREEDY, SamplingParams(), SamplingParams(seed=5, temperature=0.7)]
    rows = [row(params[i % 3]) for i in range(b)]
    meta = build(rows, pack_token_mask(mask) if packed else mask)
    assert meta.allowed_token_mask is not None and meta.allowed_token_mask.dtype == torch.int32
    tokens = Sampler()(logits, meta).sampled_token_ids
    assert mask.gather(1, tokens.unsqueeze(1)).all()
    greedy = logits.masked_fill(~mask, float("-inf")).argmax(-1)
    assert torch.equal(tokens[0::3], greedy[0::3])
    assert set(tokens[1::3].tolist()) == set(allowed_ids)  # random rows: whole set, nothing else


def test_all_true_mask_is_inactive() -> None:
    meta = build([row(), row(GREEDY)], torch.ones(2, V, dtype=torch.bool))
    assert meta.allowed_token_mask is None
    assert not AllowedTokenMask().is_active(meta)


def test_row_with_no_allowed_token_is_rejected() -> None:
    mask = torch.ones(3, V, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"no token for sampling row\(s\) \[1\]"):
        build([row(), row(), row()], mask)
    # Bits past the vocabulary do not count as allowed tokens (V = 40: 2 words, 8 valid bits).
    packed = torch.full((2, 2), -1, dtype=torch.int32)
    packed[0, 0] = 0
    packed[0, 1] = 1 << 10  # token 42 >= V
    with pytest.raises(ValueError, match=r"row\(s\) \[0\]"):
        build([row(), row()], packed, v=40)


def test_mask_shape_and_dtype_are_checked() -> None:
    with pytest.raises(ValueError, match="bool mask must be"):
        build([row()], torch.ones(2, V, dtype=torch.bool))
    with pytest.raises(ValueError, match="packed mask must be"):
        build([row()], torch.full((1, 2), -1, dtype=torch.int32))
    with pytest.raises(ValueError, match="bool or int32"):
        build([row()], torch.ones(1, V))


@pytest.mark.parametrize("v", [1, 31, 32, 33, 70])
def test_pack_unpack_layout(v: int) -> None:
    mask = torch.rand(5, v, generator=torch.Generator().manual_seed(v)) < 0.5
    mask[0] = True  # all bits, including bit 31 (the sign bit)
    packed = pack_token_mask(mask)
    assert packed.dtype == torch.int32 and packed.shape == (5, (v + 31) // 32)
    for i in range(5):
        for t in range(v):  # bit t % 32 of word t // 32, least significant first
            assert bool((int(packed[i, t // 32]) >> (t % 32)) & 1) == bool(mask[i, t])
    assert torch.equal(unpack_token_mask(packed, v), mask)


# --------------------------------------------------------------------------- logit_bias


def test_logit_bias_shifts_exactly_the_named_logits() -> None:
    logits = rand_logits(3)
    rows = [row(bias={4: 2.5, 9: -1.0}), row(), row(GREEDY, bias={0: 0.25})]
    meta = build(rows)
    out = apply_processors(logits.clone(), meta, default_processors())
    expect = logits.clone()
    expect[0, 4] += 2.5
    expect[0, 9] -= 1.0
    expect[2, 0] += 0.25
    assert torch.equal(out, expect)
    assert LogitBias().active_rows(meta).tolist() == [True, False, True]


def test_logit_bias_flips_greedy_and_bans_random() -> None:
    logits = torch.zeros(1, V)
    logits[0, 1] = 2.0
    logits[0, 6] = 1.0
    assert Sampler()(logits, build([row(GREEDY)])).sampled_token_ids.item() == 1
    flipped = Sampler()(logits, build([row(GREEDY, bias={6: 1.5})]))
    assert flipped.sampled_token_ids.item() == 6
    torch.manual_seed(0)
    base = logits[0].expand(500, V)
    free = Sampler()(base, build([row() for _ in range(500)])).sampled_token_ids
    assert (free == 1).any()
    banned = Sampler()(base, build([row(bias={1: -100.0}) for _ in range(500)]))
    assert (banned.sampled_token_ids != 1).all()


def test_logit_bias_validation_and_zero_entries() -> None:
    with pytest.raises(ValueError, match=r"row 1: logit_bias token id 32 is not in \[0, 32\)"):
        build([row(), row(bias={32: 1.0})])
    with pytest.raises(ValueError, match="row 0: logit_bias token id -1"):
        build([row(bias={-1: 1.0})])
    with pytest.raises(ValueError, match="not a finite number"):
        build([row(bias={3: float("nan")})])
    meta = build([row(bias={3: 0.0}), row(bias={})])
    assert meta.logit_bias_rows is None and not LogitBias().is_active(meta)


# --------------------------------------------------------------------------- fast path


def _cases() -> list[tuple[str, list[SamplingRow], torch.Tensor | None, bool]]:
    stop = SamplingParams(min_tokens=3)
    stop.update_from_generation_config({0})
    one_ban = torch.ones(3, V, dtype=torch.bool)
    one_ban[2, 9] = False
    plain = [row(), row(GREEDY), row(SamplingParams(temperature=0.5))]
    return [
        ("temperature-only", plain, None, True),
        ("all-true mask", plain, torch.ones(3, V, dtype=torch.bool), True),
        (
            "greedy top_k is neutral",
            [row(), row(SamplingParams(temperature=0, top_k=2))],
            None,
            True,
        ),
        ("one masked row", plain, one_ban, True),
        ("one penalty row", [*plain[:2], row(SamplingParams(presence_penalty=0.5))], None, True),
        ("one min_tokens row", [*plain[:2], row(stop)], None, True),
        ("one logit_bias row", [*plain[:2], row(bias={2: 1.0})], None, True),
        ("one seeded row", [*plain[:2], row(SamplingParams(seed=3))], None, False),
        ("one top_p row", [*plain[:2], row(SamplingParams(top_p=0.5))], None, False),
    ]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_fast_path_iff_no_truncation_or_seed(
    case: tuple[str, list[SamplingRow], torch.Tensor | None, bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Processors keep the fast path (the kernel gets their output); top-k/top-p/min-p or a
    seed anywhere in the batch sends the whole batch down the torch path."""
    _, rows, mask, fast = case
    taken: list[str] = []
    seen: list[torch.Tensor] = []

    def fake_fused(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        taken.append("fused")
        seen.append(logits.clone())
        return logits.argmax(-1)

    original = sampler_mod._sample

    def spy_sample(logits, meta, active):  # type: ignore[no-untyped-def]
        taken.append("torch")
        return original(logits, meta, active)

    monkeypatch.setattr(sampler_mod, "use_fused", lambda x: True)
    monkeypatch.setattr(sampler_mod, "_sample_fused", fake_fused)
    monkeypatch.setattr(sampler_mod, "_sample", spy_sample)
    meta = build(rows, mask)
    logits = rand_logits(len(rows))
    raw = logits.clone()
    Sampler()(logits, meta)
    assert taken == ["fused" if fast else "torch"]
    assert bool(fast_path_rows(meta).all()) == fast
    assert torch.equal(logits, raw)  # the raw logits (for logprobs) are never edited
    if fast:  # the kernel sampled the processed logits, exactly as the torch path edits them
        expected = raw.clone()
        for processor in active_processors(default_processors(), meta):
            expected = processor.apply(expected, meta)
        assert torch.equal(seen[0], expected)


def test_fast_path_rows_per_row() -> None:
    stop = SamplingParams(min_tokens=3)
    stop.update_from_generation_config({0})
    params = [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.1),
        SamplingParams(),  # biased below
        SamplingParams(),  # masked below
        SamplingParams(seed=1),
        SamplingParams(temperature=0.0, top_k=2),
        stop,
        SamplingParams(min_p=0.1),
    ]
    rows = [row(p) for p in params]
    rows[2].logit_bias = {3: 1.0}
    mask = torch.ones(len(rows), V, dtype=torch.bool)
    mask[3, 0] = False
    got = fast_path_rows(build(rows, mask))
    assert got.tolist() == [True, True, True, True, False, True, True, False]


def test_custom_processor_list() -> None:
    class Ban7(LogitsProcessor):
        """Test stage: always bans token 7."""

        name = "ban7"

        def is_active(self, meta: SamplingMetadata) -> bool:
            return True

        def active_rows(self, meta: SamplingMetadata) -> torch.Tensor:
            return torch.ones_like(meta.greedy_mask)

        def apply(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
            return logits.index_fill_(1, torch.tensor([7]), float("-inf"))

    logits = torch.zeros(2, V)
    logits[:, 7] = 5.0
    before = logits.clone()
    out = Sampler([*default_processors(), Ban7()])(logits, build([row(GREEDY), row(GREEDY)]))
    assert (out.sampled_token_ids != 7).all()
    assert torch.equal(logits, before)  # processors work on the sampler's own copy
