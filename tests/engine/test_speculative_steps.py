"""Speculative steps through the whole engine: a drafter (here a test double that knows the
true continuation, or corrupts it) proposes tokens, the worker computes and verifies them in one
step, and the scheduler rolls ``num_computed_tokens`` back over the rejected ones. Greedy
outputs must equal the plain engine's token for token whatever the drafts, with fewer steps
when drafts are right, and the prefix cache must never serve KV computed for a rejected draft.
"""

from __future__ import annotations

from typing import Any

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.core.sequence import Sequence
from pagedllm.worker.step_output import accept_drafts
from tests.fixtures.tiny_models import random_prompts

K = 3


def _gen(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _count_steps(llm: LLM) -> list[int]:
    """Records the number of draft tokens of every scheduled step."""
    runner = llm.llm_engine.runner
    inner = runner.execute_async
    log: list[int] = []

    def execute_async(step: Any) -> Any:
        if step.scheduled:
            log.append(sum(len(s.draft_token_ids) for s in step.scheduled))
        return inner(step)

    runner.execute_async = execute_async
    return log


def test_accept_drafts() -> None:
    assert accept_drafts([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]  # all right: k + 1 tokens
    assert accept_drafts([5, 6, 7], [5, 9, 7, 8]) == [5, 9]  # second wrong: its sample stands
    assert accept_drafts([5, 6, 7], [4, 6, 7, 8]) == [4]  # first wrong: one token, as usual
    assert accept_drafts([], [3]) == [3]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("corrupt", [None, 0, 1, 2], ids=["right", "bad0", "bad1", "bad2"])
def test_greedy_output_is_the_same_whatever_the_drafts(
    llama_dir: Any, tiny_tokenizer: Any, async_scheduling: bool, corrupt: int | None
) -> None:
    vocab = len(tiny_tokenizer)
    prompts = random_prompts(vocab, 6, 3, 40, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)
    llm = LLM(str(llama_dir), async_scheduling=async_scheduling, block_size=4)
    truth = _gen(llm, prompts, params)
    by_prompt = {tuple(p): t for p, t in zip(prompts, truth, strict=True)}
    proposed: list[int] = []

    def drafter(seq: Sequence, k: int) -> list[int]:
        """The true next ``k`` tokens, with the one at ``corrupt`` changed; every other
        sequence (odd prompt length) gets no drafts, so plain and speculative spans mix."""
        if len(seq.prompt_token_ids) % 2:
            return []
        done = seq.num_output_tokens
        drafts = list(by_prompt[tuple(seq.prompt_token_ids)][done : done + k])
        if corrupt is not None and corrupt < len(drafts):
            drafts[corrupt] = (drafts[corrupt] + 1) % vocab
        proposed.append(len(drafts))
        return drafts

    sched = llm.llm_engine.scheduler
    sched.drafter, sched.num_speculative_tokens = drafter, K
    steps = _count_steps(llm)
    assert _gen(llm, prompts, params) == truth
    assert sum(proposed) > 0 and max(proposed) == K
    assert sum(steps) == sum(proposed)  # every proposal was computed
    kv = sched.kv
    assert kv.pool.num_free_blocks == kv.pool.num_blocks  # nothing leaked by the rollbacks
    # Served again from the prefix cache (which may hold blocks that had drafts in them):
    # still the same tokens, so no block was indexed with a rejected draft's KV.
    sched.drafter = None
    hits = kv.prefix_hits
    assert _gen(llm, prompts, params) == truth
    assert kv.prefix_hits > hits


def test_right_drafts_need_fewer_steps(llama_dir: Any, tiny_tokenizer: Any) -> None:
    prompts = random_prompts(len(tiny_tokenizer), 4, 6, 6, seed=8)  # even: all drafted
    params = SamplingParams(temperature=0.0, max_tokens=17, ignore_eos=True)
    llm = LLM(str(llama_dir), async_scheduling=False)
    plain_steps = _count_steps(llm)
    truth = _gen(llm, prompts, params)
    by_prompt = {tuple(p): t for p, t in zip(prompts, truth, strict=True)}
    sched = llm.llm_engine.scheduler
    sched.drafter = lambda seq, k: by_prompt[tuple(seq.prompt_token_ids)][
        seq.num_output_tokens : seq.num_output_tokens + k
    ]
    sched.num_speculative_tokens = K
    n_plain = len(plain_steps)
    assert _gen(llm, prompts, params) == truth
    n_spec = len(plain_steps) - n_plain
    # Plain: the prompt step, then 16 one-token steps. Speculative: the prompt step, then
    # K + 1 tokens per step (16 = 4 * 4).
    assert (n_plain, n_spec) == (17, 5)


def test_no_drafts_for_sequences_whose_sampling_they_would_change(llama_dir: Any) -> None:
    llm = LLM(str(llama_dir), async_scheduling=False)
    sched = llm.llm_engine.scheduler
    asked: list[str] = []
    sched.drafter = lambda seq, k: asked.append(seq.seq_id) or [7] * k
    sched.num_speculative_tokens = K
    prompt = {"prompt_token_ids": [9, 10, 11]}
    for params in (
        SamplingParams(max_tokens=6, repetition_penalty=1.3),
        SamplingParams(max_tokens=6, logprobs=2),
        SamplingParams(max_tokens=6, min_tokens=6),
        SamplingParams(max_tokens=1),  # no room: max_tokens
    ):
        llm.generate(prompt, params, use_tqdm=False)
    assert asked == []
