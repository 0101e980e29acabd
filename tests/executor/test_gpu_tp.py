"""Tensor parallelism on GPUs (NCCL; needs two): fp32 greedy equals transformers token for
token, eagerly and with the all-reduces captured in CUDA graphs, and every rank samples the
same tokens (``PAGEDLLM_TP_CHECK_SAMPLES``) in bf16 with async scheduling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.executor.worker_proc import CHECK_SAMPLES_ENV
from tests.fixtures.tiny_models import hf_greedy, random_prompts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]
NEW = 16


@pytest.fixture(autouse=True)
def _check_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CHECK_SAMPLES_ENV, "1")


def _tokens(model_dir: Path, prompts: list[list[int]], params: SamplingParams, **kw: Any) -> Any:
    llm = LLM(str(model_dir), tensor_parallel_size=2, num_gpu_blocks=1024, **kw)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tp2_fp32_equals_transformers(tiny_models: Any, arch: str, enforce_eager: bool) -> None:
    model_dir = tiny_models(arch)
    prompts = random_prompts(512, 12, 1, 200, seed=5)
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    got = _tokens(
        model_dir, prompts, greedy, dtype="float32", enforce_eager=enforce_eager,
        max_num_batched_tokens=256,
    )  # fmt: skip
    assert got == hf_greedy(model_dir, prompts, NEW)


def test_tp2_bf16_sampling_agrees_on_both_ranks(tiny_models: Any) -> None:
    prompts = random_prompts(512, 16, 1, 100, seed=6)
    hot = SamplingParams(temperature=30.0, max_tokens=NEW, ignore_eos=True)
    got = _tokens(tiny_models("llama"), prompts, hot, dtype="bfloat16")
    assert len(got) == len(prompts) and all(len(t) == NEW for t in got)
