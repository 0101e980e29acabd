"""GPU: the one-pass Gumbel-max sampler draws from softmax(logits / T); greedy rows argmax."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from pagedllm.kernels.sampling import gumbel_sample  # noqa: E402


@pytest.mark.parametrize("vocab", [50, 20_000, 151_936])
@pytest.mark.parametrize("temp", [None, 0.7])
def test_gumbel_sample_matches_softmax(vocab: int, temp: float | None) -> None:
    torch.manual_seed(0)
    rows = 4000
    base = torch.full((vocab,), float("-inf"), device="cuda")
    hot = torch.tensor([3, vocab // 2, vocab - 1], device="cuda")  # slices' edges included
    base[hot] = torch.tensor([1.0, 0.3, -0.5], device="cuda")
    base[7] = 0.0
    logits = base.expand(rows, vocab).contiguous()
    temperature = None if temp is None else torch.full((rows,), temp, device="cuda")
    greedy = torch.zeros(rows, dtype=torch.bool, device="cuda")
    counts = torch.zeros(vocab, device="cuda")
    draws = 0
    for seed in range(5):
        tokens = gumbel_sample(logits, temperature, greedy, seed)
        counts += torch.bincount(tokens, minlength=vocab).float()
        draws += rows
    probs = torch.softmax(base / (temp or 1.0), dim=0)
    freq = counts / draws
    assert counts[probs == 0].sum() == 0  # -inf logits are never drawn
    sigma = (probs * (1 - probs) / draws).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-6).all(), (freq[hot], probs[hot])


def test_gumbel_sample_greedy_rows_and_seeds() -> None:
    torch.manual_seed(1)
    logits = torch.randn(64, 32_000, device="cuda")
    greedy = torch.zeros(64, dtype=torch.bool, device="cuda")
    greedy[::2] = True
    a = gumbel_sample(logits, None, greedy, 123)
    b = gumbel_sample(logits, None, greedy, 123)
    c = gumbel_sample(logits, None, greedy, 124)
    assert torch.equal(a, b)  # same seed, same draw
    assert not torch.equal(a[1::2], c[1::2])  # another seed moves the random rows
    assert torch.equal(a[::2], logits[::2].argmax(dim=1))
    assert torch.equal(c[::2], logits[::2].argmax(dim=1))
