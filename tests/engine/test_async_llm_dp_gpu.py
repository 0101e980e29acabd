"""``data_parallel_size=2`` on two GPUs: each replica's engine process sees only its own GPU
(``CUDA_VISIBLE_DEVICES``), and both give the offline engine's greedy tokens."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

from pagedllm import LLM, EngineConfig, SamplingParams
from pagedllm.engine.async_llm import AsyncLLM
from pagedllm.router.policies import RoundRobinPolicy, Router

pytestmark = [pytest.mark.gpu, pytest.mark.asyncio]

KW = {"device": "cuda", "dtype": "float32", "num_gpu_blocks": 64, "enforce_eager": True}


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode().split("=", 1) for e in raw if b"=" in e)


async def test_each_replica_gets_its_own_gpu(llama_dir: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    visible = [str(i) for i in range(torch.cuda.device_count())]
    config = EngineConfig(model=str(llama_dir), **KW)
    llm = await asyncio.to_thread(AsyncLLM.from_config, config, data_parallel_size=2)
    try:
        envs = [_environ(r.handle.proc.pid) for r in llm.replicas]
        listed = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(visible))
        base = [d.strip() for d in listed.split(",") if d.strip()]
        assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == base[:2]
        llm.router = Router(RoundRobinPolicy(), range(2))
        params = SamplingParams(temperature=0.0, max_tokens=16)
        prompts = [[5 + i, 17, 23, 42, 7 + i] for i in range(4)]

        async def one(i: int, p: list[int]) -> list[int]:
            outs = [o async for o in llm.generate(p, params, f"g{i}")]
            return list(outs[-1].outputs[0].token_ids)

        got = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        assert llm.router.routed == {0: 2, 1: 2}
    finally:
        llm.shutdown()
    ref = LLM(str(llama_dir), **KW).generate(prompts, params, use_tqdm=False)
    assert got == [list(r.outputs[0].token_ids) for r in ref]
