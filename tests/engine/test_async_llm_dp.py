"""AsyncLLM with two engine replicas (data parallelism) on the CPU, tiny model.

Greedy outputs equal the offline engine's whatever replica serves them; requests that share a
long prefix land on one replica under cache_aware (its prefix cache then hits) and alternate
under round_robin; a killed replica fails only its own requests while the other serves on; and
shutdown leaves no engine process behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from pagedllm import LLM, EngineConfig, SamplingParams
from pagedllm.engine.async_llm import AsyncLLM, EngineDeadError
from pagedllm.outputs import RequestOutput
from pagedllm.router.policies import RoundRobinPolicy, Router, build_policy
from tests.fixtures.tiny_models import random_prompts

pytestmark = pytest.mark.asyncio(loop_scope="module")

ENGINE_KW = {"num_gpu_blocks": 64, "block_size": 16}
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def dp2(llama_dir: Path) -> AsyncIterator[AsyncLLM]:
    config = EngineConfig(model=str(llama_dir), **ENGINE_KW)
    llm = await asyncio.to_thread(AsyncLLM.from_config, config, data_parallel_size=2)
    await llm.start_monitoring()
    yield llm
    llm.shutdown()


async def run(
    llm: AsyncLLM, prompt: list[int] | str, rid: str, params: SamplingParams = GREEDY
) -> RequestOutput:
    outs = [o async for o in llm.generate(prompt, params, rid)]
    return outs[-1]


async def test_two_replicas_match_the_offline_engine(
    dp2: AsyncLLM, llama_dir: Path, tiny_tokenizer
) -> None:  # type: ignore[no-untyped-def]
    assert len(dp2.replicas) == 2
    assert len({r.handle.proc.pid for r in dp2.replicas}) == 2
    prompts = random_prompts(len(tiny_tokenizer), 10, 3, 40, seed=11)
    dp2.router = Router(RoundRobinPolicy(), range(2))  # both replicas serve some of them
    ref = LLM(str(llama_dir), **ENGINE_KW).generate(prompts, GREEDY, use_tqdm=False)
    got = await asyncio.gather(*(run(dp2, p, f"eq-{i}") for i, p in enumerate(prompts)))
    for out, want in zip(got, ref, strict=True):
        assert out.outputs[0].token_ids == want.outputs[0].token_ids
        assert out.outputs[0].text == want.outputs[0].text
    assert dp2.router.routed == {0: 5, 1: 5}
    stats = await dp2.get_replica_stats()
    assert [s.requests_received_total for s, _ in stats] == [5, 5]
    assert (await dp2.get_stats()).requests_received_total == 10


def _shared_prefix_prompts(vocab: int, n: int, seed: int) -> list[list[int]]:
    prefix = random_prompts(vocab, 1, 96, 96, seed=seed)[0]  # 6 full blocks
    tails = random_prompts(vocab, n, 4, 8, seed=seed + 1)
    return [prefix + t for t in tails]


async def test_cache_aware_keeps_a_prefix_on_one_replica(dp2: AsyncLLM, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    dp2.router = Router(build_policy("cache_aware", unit=16), range(2))
    before = [s.prefix_cache_hits for s, _ in await dp2.get_replica_stats()]
    group_a = _shared_prefix_prompts(len(tiny_tokenizer), 6, seed=21)
    group_b = _shared_prefix_prompts(len(tiny_tokenizer), 6, seed=31)
    for i, (a, b) in enumerate(zip(group_a, group_b, strict=True)):
        await run(dp2, a, f"a-{i}")
        await run(dp2, b, f"b-{i}")
    # Group a took the first replica, group b the other (smallest tree), each stayed there.
    assert sorted(dp2.router.routed.values()) == [6, 6]
    after = [s.prefix_cache_hits for s, _ in await dp2.get_replica_stats()]
    # Each replica computed its group's 96-token prefix once, then hit it 5 times.
    assert [h1 - h0 for h0, h1 in zip(before, after, strict=True)] == [5 * 96, 5 * 96]


async def test_round_robin_spreads_a_shared_prefix(dp2: AsyncLLM, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    dp2.router = Router(RoundRobinPolicy(), range(2))
    before = [s.prefix_cache_hits for s, _ in await dp2.get_replica_stats()]
    for i, p in enumerate(_shared_prefix_prompts(len(tiny_tokenizer), 6, seed=41)):
        await run(dp2, p, f"rr-{i}")
    assert dp2.router.routed == {0: 3, 1: 3}
    after = [s.prefix_cache_hits for s, _ in await dp2.get_replica_stats()]
    assert [h1 - h0 for h0, h1 in zip(before, after, strict=True)] == [2 * 96, 2 * 96]


async def test_abort_reaches_the_right_replica(dp2: AsyncLLM) -> None:
    dp2.router = Router(RoundRobinPolicy(), range(2))
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    gens = [dp2.generate([7, 8, 9, 10], long, f"ab-{i}") for i in range(2)]
    firsts = await asyncio.gather(*(g.__anext__() for g in gens))
    assert all(not f.finished for f in firsts)
    await dp2.abort("ab-1")  # on replica 1
    rest = [o async for o in gens[1]]
    assert rest[-1].outputs[0].finish_reason == "abort"
    await gens[0].aclose()
    await asyncio.sleep(0)


async def test_a_dead_replica_fails_its_requests_and_the_other_serves(dp2: AsyncLLM) -> None:
    dp2.router = Router(RoundRobinPolicy(), range(2))
    deaths: list[str] = []
    dp2.on_engine_death = deaths.append
    long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    gens = [dp2.generate([11, 12, 13], long, f"dead-{i}") for i in range(2)]
    await asyncio.gather(*(g.__anext__() for g in gens))
    victim = dp2.replicas[1].handle.proc
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(EngineDeadError, match="replica 1"):
        async for _ in gens[1]:
            pass
    assert deaths and "replica 1" in deaths[0]
    await gens[0].aclose()
    assert dp2.is_running and dp2.died_unexpectedly
    await dp2.check_health()  # replica 0 still serves
    outs = await asyncio.gather(*(run(dp2, [20 + i, 21, 22], f"after-{i}") for i in range(4)))
    assert all(o.finished for o in outs)
    assert dp2.router.routed[0] == 5 and dp2.router.routed[1] == 1 and 1 not in dp2.router.loads
    stats = await dp2.get_replica_stats()
    assert [alive for _, alive in stats] == [True, False]


async def test_shutdown_leaves_no_engine_process(dp2: AsyncLLM) -> None:
    procs = [r.handle.proc for r in dp2.replicas]
    dp2.shutdown()
    assert all(not p.is_alive() for p in procs)
    assert not dp2.is_running
    with pytest.raises(EngineDeadError):
        await run(dp2, [1, 2, 3], "late")
