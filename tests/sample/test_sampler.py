"""Tests for the vectorised batch sampler (CPU, fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedllm.sample.metadata import SamplingMetadata, SamplingRow
from pagedllm.sample.penalties import apply_banned_tokens, apply_penalties
from pagedllm.sample.sampler import Sampler, SamplerOutput, compute_logprobs
from pagedllm.sampling_params import SamplingParams

V = 32
CPU = torch.device("cpu")


def row(
    params: SamplingParams | None = None,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
) -> SamplingRow:
    params = params or SamplingParams()
    gen = None
    if params.seed is not None:
        gen = torch.Generator().manual_seed(params.seed)
    return SamplingRow(params, list(prompt or [1, 2, 3]), list(output or []), gen)


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
    meta = SamplingMetadata.build(rows, logits.shape[-1], CPU)
    return Sampler()(logits, meta)


def rand_logits(b: int, v: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


# --------------------------------------------------------------------------- greedy / mixed


def test_greedy_is_argmax_and_does_not_modify_input() -> None:
    logits = rand_logits(6)
    before = logits.clone()
    out = sample(logits, [row(SamplingParams(temperature=0.0)) for _ in range(6)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.sampled_token_ids.dtype == torch.int64
    assert out.logprobs is None and out.logprob_token_ids is None
    assert out.sampled_token_ranks is None
    assert torch.equal(logits, before)


def test_mixed_greedy_and_random_batch() -> None:
    torch.manual_seed(0)
    b = 400
    logits = torch.zeros(b, V)  # uniform: random rows almost surely differ from argmax
    logits[:, 5] = 0.5
    rows = [row(SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0)) for i in range(b)]
    before = logits.clone()
    out = sample(logits, rows)
    assert torch.equal(logits, before)
    assert (out.sampled_token_ids[0::2] == 5).all()
    random_tokens = out.sampled_token_ids[1::2]
    assert (random_tokens != 5).float().mean() > 0.8
    assert len(set(random_tokens.tolist())) > 10


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=1),
        SamplingParams(top_p=1e-6),
        SamplingParams(top_p=1e-9),  # 1 - p rounds to 1.0 in fp32: the top token must survive
        SamplingParams(top_k=3, top_p=1e-9, min_p=0.5, temperature=0.3),
    ],
)
def test_degenerate_truncation_equals_greedy(params: SamplingParams) -> None:
    logits = rand_logits(64, seed=1)
    out = sample(logits, [row(params) for _ in range(64)])
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


# --------------------------------------------------------------------------- truncation


def test_min_p_never_samples_filtered_tokens() -> None:
    torch.manual_seed(0)
    base = rand_logits(1, seed=2)[0] / 3  # moderate spread
    probs = base.softmax(-1)
    min_p = 0.3
    allowed = probs >= min_p * probs.max()
    assert 1 < int(allowed.sum()) < V  # the test is meaningful
    n = 1500
    rows = [row(SamplingParams(min_p=min_p, seed=i)) for i in range(n)]
    out = sample(base.expand(n, V).clone(), rows)
    chosen = out.sampled_token_ids
    assert allowed[chosen].all()
    assert set(chosen.tolist()) == set(torch.nonzero(allowed).flatten().tolist())


@pytest.mark.parametrize("k", [2, 5, 17])
def test_top_k_never_samples_outside_top_k(k: int) -> None:
    torch.manual_seed(k)
    b = 1500
    logits = rand_logits(b, seed=3) / 3
    # Top-k alone (topk path), then mixed with top_p rows (full-sort path).
    out = sample(logits, [row(SamplingParams(top_k=k)) for _ in range(b)])
    topk_ids = logits.topk(k, dim=-1).indices
    assert (topk_ids == out.sampled_token_ids.unsqueeze(1)).any(dim=1).all()
    rows = [row(SamplingParams(top_k=k, top_p=0.999 if i % 2 else 1.0)) for i in range(b)]
    out = sample(logits, rows)
    assert (topk_ids == out.sampled_token_ids.unsqueeze(1)).any(dim=1).all()


def test_top_k_keeps_all_ties_at_threshold() -> None:
    torch.manual_seed(0)
    logits = torch.full((2000, 6), -10.0)
    logits[:, 0] = 2.0
    logits[:, 1:4] = 1.0  # three tokens tied for 2nd place
    for top_p in (1.0, 0.9999):
        rows = [row(SamplingParams(top_k=2, top_p=top_p)) for _ in range(2000)]
        chosen = set(sample(logits, rows).sampled_token_ids.tolist())
        assert chosen == {0, 1, 2, 3}


def _empirical(logits_row: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    torch.manual_seed(1234)
    out = sample(logits_row.expand(n, -1).clone(), [row(params) for _ in range(n)])
    return torch.bincount(out.sampled_token_ids, minlength=logits_row.shape[0]).float() / n


def test_sampling_distribution_matches_softmax() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2])
    freq = _empirical(logits, SamplingParams(temperature=1.0), 20000)
    assert (freq - logits.softmax(-1)).abs().max() < 0.02
    freq = _empirical(logits, SamplingParams(temperature=0.5), 20000)
    assert (freq - (logits / 0.5).softmax(-1)).abs().max() < 0.02


def test_top_k_top_p_renormalise() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2])
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    # top_k=3 -> renormalised over the 3 best.
    expect = torch.zeros(8)
    expect[order[:3]] = probs[order[:3]] / probs[order[:3]].sum()
    freq = _empirical(logits, SamplingParams(top_k=3), 20000)
    assert (freq - expect).abs().max() < 0.02
    # top_p: smallest prefix with mass >= p.
    p = float(probs[order[:2]].sum()) + 0.01
    expect = torch.zeros(8)
    expect[order[:3]] = probs[order[:3]] / probs[order[:3]].sum()
    freq = _empirical(logits, SamplingParams(top_p=p), 20000)
    assert (freq - expect).abs().max() < 0.02


# --------------------------------------------------------------------------- penalties


def reference_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Direct per-row, per-token reference in float32 arithmetic (same op order)."""
    out = logits.numpy().copy()
    f32 = np.float32
    for i, r in enumerate(rows):
        p = r.params
        rep = f32(p.repetition_penalty)
        for t in set(r.prompt_token_ids) | set(r.output_token_ids):
            out[i, t] = out[i, t] / rep if out[i, t] > 0 else out[i, t] * rep
        for t in set(r.output_token_ids):
            count = f32(r.output_token_ids.count(t))
            pen = f32(p.frequency_penalty) * count + f32(p.presence_penalty) * f32(1.0)
            out[i, t] = out[i, t] - pen
    return torch.from_numpy(out)


@pytest.mark.parametrize("seed", range(8))
def test_penalties_match_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    b = 7
    logits = rand_logits(b, seed=seed)
    rows = []
    for i in range(b):
        params = SamplingParams(
            repetition_penalty=float(rng.choice([1.0, rng.uniform(0.5, 2.0)])),
            presence_penalty=float(rng.choice([0.0, rng.uniform(-2, 2)])),
            frequency_penalty=float(rng.choice([0.0, rng.uniform(-2, 2)])),
        )
        prompt = rng.integers(0, V, size=int(rng.integers(0, 12))).tolist()
        output = rng.integers(0, V, size=int(rng.integers(0, 20))).tolist()
        if i == 0:
            output = []  # empty history is padded
        rows.append(SamplingRow(params, prompt, output, None))
    meta = SamplingMetadata.build(rows, V, CPU)
    got = apply_penalties(logits.clone(), meta)
    assert torch.equal(got, reference_penalties(logits, rows))


def test_penalties_change_logits_and_greedy_uses_them() -> None:
    logits = torch.zeros(1, V)
    logits[0, 3] = 2.0
    logits[0, 4] = 1.5
    greedy = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    meta = SamplingMetadata.build([row(greedy, prompt=[3], output=[])], V, CPU)
    assert meta.has_repetition_penalty and not meta.has_output_penalties
    pen = apply_penalties(logits.clone(), meta)
    assert pen[0, 3] == 1.0 and pen[0, 4] == 1.5
    assert sample(logits, [row(greedy, prompt=[3])]).sampled_token_ids.item() == 4
    freq = SamplingParams(temperature=0.0, frequency_penalty=0.3)
    out = sample(logits, [row(freq, prompt=[4], output=[3, 3])])
    assert out.sampled_token_ids.item() == 4  # 2.0 - 0.6 < 1.5


def test_one_penalized_row_packs_only_its_own_history() -> None:
    """A penalty request in a large batch costs its own row: histories are [1, L], and every
    other row's logits come out bit-identical."""
    b = 64
    logits = rand_logits(b, seed=3)
    plain = SamplingParams(temperature=0.0)
    rows = [row(plain, prompt=[1, 2, 3], output=[4, 5]) for _ in range(b)]
    rows[37] = row(SamplingParams(repetition_penalty=1.7, frequency_penalty=0.4), [3, 9], [9, 9])
    meta = SamplingMetadata.build(rows, V, CPU)
    assert meta.penalty_rows is not None and meta.penalty_rows.tolist() == [37]
    assert meta.prompt_token_ids is not None and meta.prompt_token_ids.shape[0] == 1
    assert meta.output_token_ids is not None and meta.output_token_ids.shape[0] == 1
    got = apply_penalties(logits.clone(), meta)
    assert torch.equal(got, reference_penalties(logits, rows))
    others = [i for i in range(b) if i != 37]
    assert torch.equal(got[others], logits[others])


def test_no_penalties_builds_no_history_tensors() -> None:
    meta = SamplingMetadata.build([row(SamplingParams(temperature=0.0))], V, CPU)
    assert meta.no_penalties and meta.all_greedy
    assert meta.prompt_token_ids is None and meta.output_token_ids is None


# --------------------------------------------------------------------------- min_tokens


def test_min_tokens_masks_stop_ids_until_reached() -> None:
    logits = torch.zeros(3, V)
    logits[:, 7] = 10.0  # EOS is by far the best
    logits[:, 9] = 5.0
    stop = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[9])
    stop.update_from_generation_config({7})
    rows = [row(stop, output=[1, 2]), row(stop, output=[1, 2, 4]), row(stop, output=[])]
    meta = SamplingMetadata.build(rows, V, CPU)
    masked = apply_banned_tokens(logits.clone(), meta)
    assert torch.isinf(masked[0, [7, 9]]).all() and torch.isinf(masked[2, [7, 9]]).all()
    assert torch.equal(masked[1], logits[1])
    out = sample(logits, rows)
    assert out.sampled_token_ids.tolist()[1] == 7
    assert out.sampled_token_ids[[0, 2]].tolist() == [0, 0]  # neither 7 nor 9
    rand = SamplingParams(min_tokens=1)
    rand.update_from_generation_config({7})
    many = sample(logits[0].expand(500, V).clone(), [row(rand) for _ in range(500)])
    assert (many.sampled_token_ids != 7).all()


# --------------------------------------------------------------------------- seeds


def test_seeded_reproducible_and_batch_independent() -> None:
    base = rand_logits(1, seed=5)[0] / 3
    seeded = SamplingParams(seed=42, top_k=20, min_p=0.01)

    def draw(others: int, index: int, other_params: SamplingParams) -> list[int]:
        logits = rand_logits(others + 1, seed=others + 100) / 3
        logits[index] = base
        rows = [row(other_params) for _ in range(others + 1)]
        rows[index] = row(seeded)  # fresh generator for each run
        meta = SamplingMetadata.build(rows, V, CPU)
        toks = []
        for _ in range(10):  # 10 steps with the same generator
            toks.append(int(Sampler()(logits, meta).sampled_token_ids[index]))
        return toks

    first = draw(0, 0, SamplingParams())
    assert len(set(first)) > 3  # actually random
    assert draw(0, 0, SamplingParams()) == first
    assert draw(5, 3, SamplingParams()) == first
    assert draw(9, 9, SamplingParams(top_p=0.5, temperature=0.7)) == first
    assert draw(4, 1, SamplingParams(temperature=0.0, repetition_penalty=1.3)) == first
    assert draw(3, 2, SamplingParams(seed=7)) == first
    other_seed = SamplingParams(seed=43, top_k=20, min_p=0.01)
    logits = base.unsqueeze(0)
    meta = SamplingMetadata.build([row(other_seed)], V, CPU)
    alt = [int(Sampler()(logits, meta).sampled_token_ids[0]) for _ in range(10)]
    assert alt != first


# --------------------------------------------------------------------------- logprobs


def test_compute_logprobs_values_ranks_and_ties() -> None:
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, -1.0], [0.5, 0.1, 0.2, 0.9, 0.3]])
    tokens = torch.tensor([2, 4])
    ids, lps, ranks = compute_logprobs(logits, tokens, 3)
    ref = torch.log_softmax(logits, dim=-1)
    assert ids.shape == (2, 4) and lps.shape == (2, 4) and lps.dtype == torch.float32
    assert ids[:, 0].tolist() == [2, 4]
    assert torch.equal(lps, ref.gather(1, ids))
    assert ranks.tolist() == [1, 3]  # ties share rank 1; 0.3 is 3rd in row 1
    assert set(ids[0, 1:3].tolist()) == {1, 2} and ids[0, 3] == 0
    assert ids[1, 1:].tolist() == [3, 0, 4]
    assert (lps[:, 1:-1] >= lps[:, 2:]).all()
    _, _, r = compute_logprobs(logits, torch.tensor([3, 1]), 0)
    assert r.tolist() == [4, 5]
    ids0, lps0, _ = compute_logprobs(logits.half(), tokens, 0)
    assert ids0.shape == (2, 1) and lps0.dtype == torch.float32


def test_sampler_logprobs_from_raw_logits() -> None:
    torch.manual_seed(0)
    b = 6
    logits = rand_logits(b, seed=9)
    params = [
        SamplingParams(logprobs=2, temperature=0.5, repetition_penalty=1.5, top_k=4),
        SamplingParams(logprobs=0, temperature=0.0, presence_penalty=1.0),
        SamplingParams(logprobs=5, top_p=0.5),
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(logprobs=1, min_p=0.2, seed=3),
    ]
    rows = [row(p, prompt=[0, 1, 2], output=[3, 4]) for p in params]
    out = sample(logits, rows)
    assert out.logprob_token_ids is not None and out.logprobs is not None
    assert out.sampled_token_ranks is not None
    assert out.logprob_token_ids.shape == (b, 6)
    ref = torch.log_softmax(logits, dim=-1)
    assert torch.equal(out.logprob_token_ids[:, 0], out.sampled_token_ids)
    assert torch.equal(out.logprobs, ref.gather(1, out.logprob_token_ids))
    assert torch.equal(out.logprob_token_ids[:, 1:], ref.topk(5, dim=-1).indices)
    expect_ranks = (ref > ref.gather(1, out.sampled_token_ids[:, None])).sum(-1) + 1
    assert torch.equal(out.sampled_token_ranks, expect_ranks)


@pytest.mark.gpu
def test_fused_path_samples_processed_logits_on_gpu() -> None:
    """On CUDA a batch with active processors (a logit bias, an allowed-token mask, a
    penalty) still takes the one-pass kernel: draws follow the softmax of the processed
    logits, masked tokens never come, greedy rows take the processed argmax."""
    cuda = torch.device("cuda")
    v, n = 64, 40000
    logits = (torch.randn(v, generator=torch.Generator().manual_seed(3)) * 2).to(cuda)
    allowed = torch.zeros(n + 1, v, dtype=torch.bool)
    allowed[:, :8] = True
    params = [SamplingParams(temperature=1.0) for _ in range(n)]
    params.append(SamplingParams(temperature=0.0, repetition_penalty=2.0))
    rows = [row(p, prompt=[1]) for p in params]
    for r in rows[:n]:
        r.logit_bias = {3: 2.0}
    meta = SamplingMetadata.build(rows, v, cuda, allowed.to(cuda))
    torch.manual_seed(7)
    out = Sampler()(logits.expand(n + 1, -1).contiguous(), meta).sampled_token_ids.cpu()
    processed = logits.cpu().clone()
    processed[3] += 2.0
    processed[8:] = float("-inf")
    freq = torch.bincount(out[:n], minlength=v).float() / n
    assert int(out[:n].max()) < 8
    assert (freq - processed.softmax(-1)).abs().max() < 0.015
    greedy = logits.cpu().clone()
    greedy[1] = greedy[1] / 2.0 if greedy[1] > 0 else greedy[1] * 2.0
    greedy[8:] = float("-inf")
    assert int(out[n]) == int(greedy.argmax())
