"""Batch seats and request order through the engine.

* n > 1 never runs more than ``max_num_seqs`` sequences at once (siblings without a seat wait
  and are recomputed later), and the tokens are the same whatever the cap.
* ``priority`` needs ``scheduling_policy="priority"`` (``--scheduling-policy priority``);
  under the default ``fcfs`` a nonzero priority is a precise ValueError.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.outputs import RequestOutput
from tests.fixtures.tiny_models import random_prompts

N = 6
PARAMS = {
    "greedy": SamplingParams(n=N, temperature=0.0, max_tokens=10, ignore_eos=True),
    "seeded": SamplingParams(n=N, temperature=1.0, seed=11, max_tokens=10, ignore_eos=True),
}


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return random_prompts(len(tiny_tokenizer), 2, 5, 30, seed=8)


def _watch_seats(llm: LLM) -> dict[str, int]:
    """Check ``len(running) <= max_num_seqs`` after every ``schedule()``; record the peak and
    how many siblings ever waited for a seat."""
    sched = llm.llm_engine.scheduler
    seen = {"peak": 0, "queued_siblings": 0}
    schedule = sched.schedule

    def checked():  # type: ignore[no-untyped-def]
        out = schedule()
        assert len(sched.running) <= sched.max_num_seqs, (
            f"{len(sched.running)} running with max_num_seqs={sched.max_num_seqs}"
        )
        seen["peak"] = max(seen["peak"], len(sched.running))
        seen["queued_siblings"] += sum(1 for r in sched.waiting if r.index > 0)
        return out

    sched.schedule = checked  # type: ignore[method-assign]
    return seen


def _tokens(outs: list[RequestOutput]) -> list[list[list[int]]]:
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-cache", "no-cache"])
@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_n_is_capped_by_max_num_seqs_with_the_same_tokens(
    llama_dir: Path,
    prompts: list[list[int]],
    kind: str,
    prefix_caching: bool,
    async_scheduling: bool,
) -> None:
    params = PARAMS[kind]
    results = {}
    for cap in (64, 2):
        llm = LLM(
            str(llama_dir),
            max_num_seqs=cap,
            block_size=4,
            enable_prefix_caching=prefix_caching,
            async_scheduling=async_scheduling,
        )
        seen = _watch_seats(llm)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert all(len(o.outputs) == N for o in outs)
        results[cap] = _tokens(outs)
        if cap == 2:
            assert seen["peak"] == 2 and seen["queued_siblings"] > 0
        else:
            assert seen["peak"] >= N  # siblings forked straight into the batch
        pool = llm.llm_engine.scheduler.kv.pool
        assert pool.num_free_blocks == pool.num_blocks
    assert results[2] == results[64]
    if kind == "seeded":  # per-sequence generators: the siblings really differ
        assert len({tuple(t) for t in results[2][0]}) > 1


@pytest.mark.parametrize("kind", sorted(PARAMS))
def test_same_tokens_under_preemption_and_chunking(
    llama_dir: Path, prompts: list[list[int]], kind: str
) -> None:
    """3 seats, a pool of 8 blocks and a 7-token budget: preemption, chunked prefills and queued
    siblings interleave; the tokens are still those of an unconstrained run."""
    results = {}
    for cap, kw in ((64, {}), (3, {"num_gpu_blocks": 8, "max_num_batched_tokens": 7})):
        llm = LLM(str(llama_dir), max_num_seqs=cap, block_size=4, **kw)  # type: ignore[arg-type]
        _watch_seats(llm)
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts], PARAMS[kind], use_tqdm=False
        )
        results[cap] = _tokens(outs)
        if kw:
            assert llm.llm_engine.scheduler.num_preemptions > 0
    assert results[3] == results[64]


def test_a_lone_group_wider_than_the_batch_finishes(llama_dir: Path) -> None:
    """n=8 with max_num_seqs=1: one sequence at a time, all eight returned."""
    llm = LLM(str(llama_dir), max_num_seqs=1)
    seen = _watch_seats(llm)
    params = SamplingParams(n=8, temperature=1.0, seed=3, max_tokens=4, ignore_eos=True)
    (out,) = llm.generate({"prompt_token_ids": [7, 8, 9]}, params, use_tqdm=False)
    assert [c.index for c in out.outputs] == list(range(8))
    assert all(len(c.token_ids) == 4 for c in out.outputs)
    assert seen["peak"] == 1


# ---- priority ------------------------------------------------------------------------------


def test_fcfs_rejects_a_priority(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir))
    assert llm.llm_engine.config.scheduler_config.scheduling_policy == "fcfs"
    engine = llm.llm_engine
    needle = r"priority 3 but priority scheduling is not enabled \(--scheduling-policy priority\)"
    with pytest.raises(ValueError, match=needle):
        engine.add_request(None, [5, 6, 7], SamplingParams(max_tokens=2), priority=3)
    with pytest.raises(ValueError, match="--scheduling-policy priority"):
        llm.generate([[5, 6], [7, 8]], SamplingParams(max_tokens=2), priority=[0, -1])
    assert not engine.has_unfinished_requests()
    out = llm.generate([[5, 6], [7, 8]], SamplingParams(max_tokens=2), priority=[0, 0])
    assert len(out) == 2


@pytest.mark.parametrize(
    "policy,priorities,order",
    [
        ("priority", [2, 0, 1], [1, 2, 0]),  # lower value first
        ("priority", [1, 1, 0], [2, 0, 1]),  # then arrival
        ("fcfs", [0, 0, 0], [0, 1, 2]),
    ],
)
def test_policy_orders_requests(
    llama_dir: Path, policy: str, priorities: list[int], order: list[int]
) -> None:
    llm = LLM(str(llama_dir), max_num_seqs=1, scheduling_policy=policy)
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    ids = [
        engine.add_request(None, [5 + i, 6, 7], params, priority=p)
        for i, p in enumerate(priorities)
    ]
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == [ids[i] for i in order]
