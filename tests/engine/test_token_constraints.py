"""``allowed_token_ids`` and ``bad_words`` through the engine (CPU, tiny model): only allowed
ids are ever sampled; a bad word never appears, while the same request without it does produce
it; out-of-range ids are a ValueError that queues nothing."""

from __future__ import annotations

from typing import Any

import pytest

from pagedllm import LLM, SamplingParams
from tests.fixtures.tiny_models import random_prompts


@pytest.fixture(scope="module")
def llm(llama_dir: Any) -> LLM:
    return LLM(str(llama_dir))


def test_only_allowed_ids_are_sampled(llm: LLM, tiny_tokenizer: Any) -> None:
    allowed = [40, 41, 57, 300]
    prompts = [{"prompt_token_ids": p} for p in random_prompts(len(tiny_tokenizer), 4, 3, 9, 1)]
    params = SamplingParams(
        n=2, temperature=1.0, seed=3, max_tokens=20, ignore_eos=True, allowed_token_ids=allowed
    )
    for out in llm.generate(prompts, params, use_tqdm=False):
        for c in out.outputs:
            assert len(c.token_ids) == 20 and set(c.token_ids) <= set(allowed)
    free = SamplingParams(temperature=1.0, seed=3, max_tokens=20, ignore_eos=True)
    outs = llm.generate(prompts, free, use_tqdm=False)
    assert any(set(o.outputs[0].token_ids) - set(allowed) for o in outs)  # the mask mattered


def test_bad_words_never_appear(llm: LLM, tiny_tokenizer: Any) -> None:
    prompt = {"prompt_token_ids": random_prompts(len(tiny_tokenizer), 1, 5, 5, 4)[0]}
    free = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    text_ids = list(llm.generate(prompt, free, use_tqdm=False)[0].outputs[0].token_ids)
    # A "word" the model does produce greedily: two consecutive tokens of its output.
    word = tiny_tokenizer.decode(text_ids[3:5])
    word_ids = tiny_tokenizer.encode(word, add_special_tokens=False)
    banned = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, bad_words=[word])
    got = list(llm.generate(prompt, banned, use_tqdm=False)[0].outputs[0].token_ids)
    assert got[:3] == text_ids[:3] and got != text_ids
    n = len(word_ids)
    assert all(got[i : i + n] != word_ids for i in range(len(got) - n + 1))


def test_out_of_range_allowed_ids(llm: LLM) -> None:
    vocab = llm.llm_engine.runner.vocab_size
    with pytest.raises(ValueError, match="allowed_token_ids"):
        llm.generate("x", SamplingParams(allowed_token_ids=[1, vocab]), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
    with pytest.raises(ValueError, match="bad_words"):
        SamplingParams(bad_words=["ok", " "])
