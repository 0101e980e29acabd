"""Greedy output equals transformers token for token, whatever path the scheduler takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams
from tests.fixtures.tiny_models import hf_greedy, random_prompts

MAX_NEW = 12


def _greedy(**kw: int | bool) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, **kw)


def _run(model_dir: Path, prompts: list[list[int]], **engine_kw: object) -> list[list[int]]:
    llm = LLM(str(model_dir), **engine_kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    _assert_pool_empty(llm)
    return [o.outputs[0].token_ids for o in outs]


def _assert_pool_empty(llm: LLM) -> None:
    pool = llm.llm_engine.scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert all(b.ref_cnt == 0 for b in pool.blocks)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return random_prompts(len(tiny_tokenizer), 8, 1, 45, seed=7)


@pytest.mark.parametrize(
    "arch,kw",
    [
        ("llama", {}),
        ("llama", {"sharded": True, "tie_word_embeddings": True}),
        ("llama3", {}),
        ("llama3", {"config_style": "legacy"}),  # top-level rope_theta / rope_scaling
        ("mistral", {}),
        ("qwen2", {}),
        ("qwen3", {}),
    ],
)
def test_architectures_match_transformers(tiny_models, prompts, arch, kw) -> None:  # type: ignore[no-untyped-def]
    model_dir = tiny_models(arch, **kw)
    assert _run(model_dir, prompts) == hf_greedy(model_dir, prompts, MAX_NEW)


@pytest.mark.parametrize(
    "engine_kw",
    [
        pytest.param({"enable_prefix_caching": False}, id="no-prefix-cache"),
        pytest.param({"max_num_batched_tokens": 7}, id="chunked-prefill-budget-7"),
        pytest.param({"max_num_batched_tokens": 1, "block_size": 4}, id="budget-1"),
        pytest.param({"num_gpu_blocks": 8, "block_size": 8}, id="preemption"),
        pytest.param({"max_num_seqs": 2}, id="max-num-seqs-2"),
        pytest.param({"block_size": 1}, id="block-size-1"),
        pytest.param(
            {"enable_chunked_prefill": False, "max_num_batched_tokens": 512, "max_model_len": 512},
            id="no-chunking",
        ),
    ],
)
def test_scheduler_paths_match_transformers(llama_dir, prompts, engine_kw) -> None:  # type: ignore[no-untyped-def]
    assert _run(llama_dir, prompts, **engine_kw) == hf_greedy(llama_dir, prompts, MAX_NEW)


def test_preemption_really_happens(llama_dir, prompts) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(str(llama_dir), num_gpu_blocks=8, block_size=8)
    llm.generate([{"prompt_token_ids": p} for p in prompts], _greedy(), use_tqdm=False)
    assert llm.llm_engine.scheduler.num_preemptions > 0


def test_prefix_cache_hits_and_same_tokens(llama_dir, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    shared = random_prompts(len(tiny_tokenizer), 1, 40, 40, seed=3)[0]
    tails = random_prompts(len(tiny_tokenizer), 4, 1, 9, seed=4)
    prompts = [shared + t for t in tails]
    llm = LLM(str(llama_dir), block_size=8)
    first = llm.generate({"prompt_token_ids": prompts[0]}, _greedy(), use_tqdm=False)[0]
    assert first.num_cached_tokens == 0
    rest = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], _greedy(), use_tqdm=False)
    assert all(o.num_cached_tokens == 40 for o in rest)  # 5 full blocks of the shared prefix
    ref = hf_greedy(llama_dir, prompts, MAX_NEW)
    assert [first.outputs[0].token_ids] + [o.outputs[0].token_ids for o in rest] == ref
    assert llm.llm_engine.stats().prefix_cache_hits == 120
    # The same prompt again: everything but the last token's block comes from the cache.
    again = llm.generate({"prompt_token_ids": prompts[0]}, _greedy(), use_tqdm=False)[0]
    assert again.num_cached_tokens == (len(prompts[0]) - 1) // 8 * 8
    assert again.outputs[0].token_ids == ref[0]


def test_abort_midway_leaves_others_exact(llama_dir, prompts) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(str(llama_dir), max_num_batched_tokens=16)
    engine = llm.llm_engine
    ids = [engine.add_request(None, p, _greedy()) for p in prompts]
    finished: dict[str, list[int]] = {}
    aborted = {ids[1], ids[4], ids[6]}
    for step in range(1000):
        if step == 3:
            engine.abort_request(sorted(aborted))
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
                if out.request_id in aborted:
                    assert out.outputs[0].finish_reason == "abort"
        if not engine.has_unfinished_requests():
            break
    assert set(finished) == set(ids)
    ref = hf_greedy(llama_dir, prompts, MAX_NEW)
    for rid, p_ref in zip(ids, ref, strict=True):
        if rid not in aborted:
            assert finished[rid] == p_ref
        else:
            assert finished[rid] == p_ref[: len(finished[rid])]
    _assert_pool_empty(llm)


def test_n_completions_share_prompt_blocks(llama_dir, prompts) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(str(llama_dir), block_size=4, enable_prefix_caching=False)
    engine = llm.llm_engine
    prompt = max(prompts, key=len)
    rid = engine.add_request(None, prompt, _greedy(n=3))
    shared_seen = False
    outs = []
    while engine.has_unfinished_requests():
        outs = engine.step()
        refs = [b.ref_cnt for b in engine.scheduler.kv.pool.blocks]
        shared_seen |= max(refs) == 3
    assert shared_seen, "the 3 sequences never shared the prompt's blocks"
    (out,) = outs
    assert out.request_id == rid and [c.index for c in out.outputs] == [0, 1, 2]
    ref = hf_greedy(llama_dir, [prompt], MAX_NEW)[0]
    assert all(c.token_ids == ref for c in out.outputs)
    _assert_pool_empty(llm)
