"""The runner reuses sampling metadata across steady decode steps without changing a token:
seeded random sampling gives the same outputs with the cache as with a fresh build per step,
while sequences finish one after another (each change of the batch must rebuild)."""

from __future__ import annotations

from typing import Any

from pagedllm import LLM, SamplingParams
from pagedllm.sample.metadata import SamplingMetadata
from tests.fixtures.tiny_models import random_prompts


def test_cache_hits_and_changes_nothing(llama_dir: Any, tiny_tokenizer: Any) -> None:
    prompts = [{"prompt_token_ids": p} for p in random_prompts(len(tiny_tokenizer), 5, 3, 20, 4)]
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=6 + 2 * i, ignore_eos=True)
        for i in range(5)
    ]
    # Rows whose metadata follows their tokens: rebuilt fields on cache hits.
    params[1].repetition_penalty = 1.5
    params[2].frequency_penalty, params[2].presence_penalty = 0.8, 0.5
    params[3].min_tokens, params[3].ignore_eos = 5, False
    llm = LLM(str(llama_dir), max_num_seqs=3)  # finishing ones make room for waiting ones
    cache = llm.llm_engine.runner.sampling_cache
    cached = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert cache.hits > 0
    cache.get = lambda rows, ids, mask=None: SamplingMetadata.build(
        rows, cache.vocab_size, cache.device, mask
    )
    fresh = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert cached == fresh
