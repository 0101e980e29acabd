"""Async scheduling (step N+1 scheduled before step N's tokens are read back) changes nothing:
the same tokens as transformers / the synchronous engine on every scheduler path."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from tests.fixtures.tiny_models import hf_greedy, random_prompts

NEW = 12


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return random_prompts(len(tiny_tokenizer), 8, 1, 45, seed=21)


def _gen(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list:  # type: ignore[type-arg]
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def _idle(llm: LLM) -> bool:
    pool = llm.llm_engine.scheduler.kv.pool
    return pool.num_free_blocks == pool.num_blocks and llm.llm_engine._inflight is None


@pytest.mark.parametrize(
    "engine_kw",
    [
        pytest.param({}, id="default"),
        pytest.param({"max_num_batched_tokens": 7}, id="chunked-7"),
        pytest.param({"num_gpu_blocks": 8, "block_size": 8}, id="preemption"),
        pytest.param({"max_num_seqs": 3, "block_size": 4}, id="max-seqs-3"),
    ],
)
def test_greedy_equals_transformers(llama_dir, prompts, engine_kw) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(str(llama_dir), async_scheduling=True, **engine_kw)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in _gen(llm, prompts, params)]
    assert got == hf_greedy(llama_dir, prompts, NEW)
    assert _idle(llm)


def test_same_results_as_sync_for_stops_seeds_logprobs_n(llama_dir, prompts) -> None:  # type: ignore[no-untyped-def]
    sync = LLM(str(llama_dir), async_scheduling=False, max_num_batched_tokens=16)
    asyn = LLM(str(llama_dir), async_scheduling=True, max_num_batched_tokens=16)
    base = _gen(sync, prompts[:1], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[
        0
    ].outputs[0]
    cases = [
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[base.text[4:7]]),
        SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[base.token_ids[3]]),
        SamplingParams(
            temperature=0.9, top_p=0.9, seed=7, max_tokens=16, ignore_eos=True, logprobs=3
        ),
        SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True),
        SamplingParams(
            temperature=0.0, max_tokens=10, ignore_eos=True, repetition_penalty=1.3, min_tokens=4
        ),
    ]
    for params in cases:
        a = _gen(sync, prompts, params)
        b = _gen(asyn, prompts, params)
        for x, y in zip(a, b, strict=True):
            for cx, cy in zip(x.outputs, y.outputs, strict=True):
                assert (cx.token_ids, cx.text, cx.finish_reason, cx.stop_reason) == (
                    cy.token_ids,
                    cy.text,
                    cy.finish_reason,
                    cy.stop_reason,
                )
                if cx.logprobs is not None:
                    assert [set(e) for e in cx.logprobs] == [set(e) for e in cy.logprobs]
    assert _idle(asyn)


def test_abort_while_a_step_is_in_flight(llama_dir, prompts) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(str(llama_dir), async_scheduling=True)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    ids = [engine.add_request(None, p, params) for p in prompts]
    done: dict[str, list[int]] = {}
    for step in range(200):
        if step == 4:
            assert engine._inflight is not None
            engine.abort_request([ids[0], ids[5]])
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        if not engine.has_unfinished_requests():
            break
    ref = hf_greedy(llama_dir, prompts, NEW)
    assert set(done) == set(ids)
    for i, rid in enumerate(ids):
        if i in (0, 5):
            assert done[rid] == ref[i][: len(done[rid])] and len(done[rid]) < NEW
        else:
            assert done[rid] == ref[i]
    assert _idle(llm)


def test_a_penalty_request_does_not_slow_the_others(llama_dir, prompts) -> None:  # type: ignore[no-untyped-def]
    """Only the sequence that needs its last token on the host waits a step; the rest stay a
    step ahead (before, one such request made every step synchronous)."""
    llm = LLM(str(llama_dir), async_scheduling=True)
    engine = llm.llm_engine
    plain = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    penalised = SamplingParams(
        temperature=0.0, max_tokens=40, ignore_eos=True, repetition_penalty=1.3
    )
    ids = [engine.add_request(None, p, plain) for p in prompts[:4]]
    slow = engine.add_request(None, prompts[4], penalised)
    got: dict[str, list[int]] = {rid: [] for rid in [*ids, slow]}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            got[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        if steps < 30:  # the plain requests run: a step is always in flight (pipelined)
            assert engine._inflight is not None, steps
        if steps == 20:
            counts = {rid: len(engine.scheduler.sequences[rid].output_token_ids) for rid in ids}
            slow_count = len(engine.scheduler.sequences[slow].output_token_ids)
            assert min(counts.values()) >= 18  # one token per step, one step behind
            assert slow_count <= 11  # one token every other step
    ref = hf_greedy(llama_dir, prompts[:4], 40)
    assert [got[rid] for rid in ids] == ref
    sync = LLM(str(llama_dir), async_scheduling=False)
    expected = _gen(sync, prompts[4:5], penalised)[0].outputs[0].token_ids
    assert got[slow] == expected
    assert _idle(llm)
