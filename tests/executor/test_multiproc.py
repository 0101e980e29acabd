"""Tensor parallelism through the engine (CPU, gloo): TP=2 and TP=4 give TP=1's tokens.

Rank 0 runs in the test process, the other ranks in spawned workers that receive each step
as data. Greedy output must equal TP=1 token for token in fp32 on every architecture, through
async scheduling, chunked prefill, preemption and prefix-cache hits. Sampling must agree on
every rank: ``PAGEDLLM_TP_CHECK_SAMPLES=1`` makes each worker report its sampled tokens and
rank 0 raises on the first difference (a worker seeded differently fails these tests). A
worker that dies, at start or while serving, is a RuntimeError naming its rank, and no
process outlives the engine.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pagedllm import LLM, EngineConfig, SamplingParams
from pagedllm.distributed import get_tp_size
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.executor.worker_proc import CHECK_SAMPLES_ENV
from tests.fixtures.tiny_models import ARCHES, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture(autouse=True)
def _check_samples(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(CHECK_SAMPLES_ENV, "1")
    yield
    assert get_tp_size() == 1, "an engine left the tensor-parallel group initialized"
    assert not multiprocessing.active_children(), "a worker outlived its engine"


def _tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _tp_tokens(model: Path, prompts: list[list[int]], tp: int, **kw: Any) -> list[list[int]]:
    llm = LLM(str(model), dtype="float32", tensor_parallel_size=tp, **kw)
    try:
        return _tokens(llm, prompts, GREEDY)
    finally:
        llm.llm_engine.shutdown()


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer: Any) -> list[list[int]]:
    return random_prompts(len(tiny_tokenizer), 5, 2, 40, seed=11)


@pytest.mark.parametrize("arch", ARCHES)
def test_tp2_greedy_equals_tp1(arch: str, tiny_models: Any, prompts: list[list[int]]) -> None:
    model = tiny_models(arch)
    want = _tp_tokens(model, prompts, 1)
    assert _tp_tokens(model, prompts, 2, async_scheduling=True) == want


@pytest.mark.parametrize(
    "engine_kw",
    [
        pytest.param({"max_num_batched_tokens": 7}, id="chunked-7"),
        pytest.param({"num_gpu_blocks": 8, "block_size": 8}, id="preemption"),
    ],
)
def test_tp2_scheduler_paths(llama_dir: Path, prompts: list[list[int]], engine_kw: Any) -> None:
    want = _tp_tokens(llama_dir, prompts, 1)
    assert _tp_tokens(llama_dir, prompts, 2, async_scheduling=True, **engine_kw) == want


def test_tp4_replicated_kv_heads_and_prefix_hits(
    tiny_models: Any, prompts: list[list[int]]
) -> None:
    """qwen3 has 2 KV heads: over 4 ranks each is held twice. The prompts run twice, the
    second time from the prefix cache."""
    model = tiny_models("qwen3")
    want = _tp_tokens(model, prompts, 1)
    llm = LLM(str(model), dtype="float32", tensor_parallel_size=4, block_size=4)
    try:
        assert _tokens(llm, prompts, GREEDY) == want
        again = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in again] == want
        assert sum(o.num_cached_tokens or 0 for o in again) > 0
    finally:
        llm.llm_engine.shutdown()


def test_tp2_sampling_agrees_on_every_rank(llama_dir: Path, prompts: list[list[int]]) -> None:
    """Unseeded and seeded high-temperature sampling, penalties (their own host-synced path),
    n > 1 and a grammar-constrained request (the two-halves step): every rank samples the same
    tokens (the check mode raises otherwise); a seeded request repeats itself."""
    llm = LLM(str(llama_dir), dtype="float32", tensor_parallel_size=2, async_scheduling=True)
    try:
        hot = SamplingParams(temperature=50.0, max_tokens=12, ignore_eos=True)
        seeded = SamplingParams(temperature=50.0, max_tokens=12, ignore_eos=True, seed=7, n=2)
        penalized = SamplingParams(
            temperature=5.0, max_tokens=12, ignore_eos=True, repetition_penalty=1.5
        )
        choice = SamplingParams(
            temperature=50.0, max_tokens=12, structured_outputs={"choice": ["alpha", "beta"]}
        )
        batch = [hot, seeded, penalized, choice, hot]
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], batch, use_tqdm=False)
        assert outs[3].outputs[0].text in ("alpha", "beta")
        unseeded = [list(o.outputs[0].token_ids) for o in (outs[0], outs[4])]
        assert unseeded[0] != unseeded[1] or prompts[0] != prompts[4]
        again = llm.generate([{"prompt_token_ids": prompts[1]}], seeded, use_tqdm=False)
        assert [c.token_ids for c in again[0].outputs] == [c.token_ids for c in outs[1].outputs]
    finally:
        llm.llm_engine.shutdown()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_worker_death_is_named_and_nothing_is_left(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), dtype="float32", tensor_parallel_size=2)
    executor = llm.llm_engine.executor
    worker = executor.procs[0]  # type: ignore[attr-defined]
    assert _tokens(llm, [[5, 6, 7]], GREEDY)
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(5)
    deadline = time.monotonic() + 10
    while executor.health.failure is None and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.01)  # the monitor thread sees the sentinel
    with pytest.raises(RuntimeError, match=r"worker rank 1 \(pid \d+\) exited unexpectedly"):
        _tokens(llm, [[5, 6, 7, 8]], GREEDY)
    llm.llm_engine.shutdown()
    assert not _alive(worker.pid)


def test_worker_that_dies_at_start_is_named(llama_dir: Path) -> None:
    """Kill rank 1 as soon as it exists: the engine's start-up fails, naming it, instead of
    waiting for a rank that will never join."""
    stop = threading.Event()

    def kill_first_worker() -> None:
        while not stop.is_set():
            for child in multiprocessing.active_children():
                if child.name == "pagedllm-tp-rank1" and child.pid:
                    os.kill(child.pid, signal.SIGKILL)
                    return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_first_worker)
    killer.start()
    try:
        with pytest.raises(RuntimeError, match="worker rank 1"):
            LLM(str(llama_dir), dtype="float32", tensor_parallel_size=2)
    finally:
        stop.set()
        killer.join()


def test_tp2_in_the_serving_engine_process(llama_dir: Path, prompts: list[list[int]]) -> None:
    """``serve -tp 2``: the engine process (a daemon) starts the workers and stops them."""
    want = _tp_tokens(llama_dir, prompts[:2], 1)
    engine = AsyncLLM.from_config(
        EngineConfig(model=str(llama_dir), dtype="float32", tensor_parallel_size=2)
    )

    async def run(i: int, prompt: list[int]) -> list[int]:
        last = None
        async for out in engine.generate(prompt, GREEDY, f"tp-{i}"):
            last = out
        assert last is not None
        return list(last.outputs[0].token_ids)

    async def main() -> list[list[int]]:
        return list(await asyncio.gather(*(run(i, p) for i, p in enumerate(prompts[:2]))))

    try:
        assert asyncio.run(main()) == want
    finally:
        engine.shutdown()


def test_tp2_gptq_checkpoint_greedy_equals_tp1(
    tmp_path: Path, tiny_tokenizer_dir: Path, prompts: list[list[int]]
) -> None:
    """The deployment study's shape of run: a GPTQ checkpoint (GPTQModel's) at -tp 2."""
    from tests.fixtures.quantized_models import materialize

    model = materialize("gptq-llama-int8-g64", tmp_path / "gptq", tiny_tokenizer_dir)
    want = _tp_tokens(model, prompts, 1)
    assert _tp_tokens(model, prompts, 2, async_scheduling=True) == want
