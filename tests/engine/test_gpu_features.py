"""GPU vs CPU: every per-request feature gives the same greedy tokens on both devices.

One batch mixes plain rows with penalty rows, logit bias, allowed/banned tokens, min_tokens,
logprobs and grammar-constrained rows (JSON schema and regex), so the GPU path's packed
per-row stages (penalty rows only, banned-token rows, the grammar bitmask applied between
``execute_model`` and ``sample_tokens``) run beside the fast path under async scheduling and
CUDA graphs. Both devices run fp32 with IEEE dots; the CPU engine equals transformers (see
``test_generate_vs_hf``), so equal tokens here mean the GPU stages are right too.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from pagedllm import LLM, SamplingParams
from tests.fixtures.tiny_models import random_prompts

pytestmark = pytest.mark.gpu
SCHEMA = {
    "type": "object",
    "properties": {"kind": {"enum": ["bug", "question"]}, "n": {"type": "integer", "maximum": 99}},
    "required": ["kind", "n"],
    "additionalProperties": False,
}


def _params() -> list[SamplingParams]:
    base: dict[str, Any] = {"temperature": 0.0, "max_tokens": 20, "ignore_eos": True}
    special: list[dict[str, Any]] = [
        {"repetition_penalty": 1.3},
        {"frequency_penalty": 0.7, "presence_penalty": 0.4},
        {"logit_bias": {5: 8.0, 6: -100.0}},
        {"allowed_token_ids": list(range(40, 90))},
        {"bad_words": ["a", "the"]},
        {"min_tokens": 10, "ignore_eos": False},
        {"logprobs": 3},
        {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}, "max_tokens": 40},
        {"structured_outputs": {"regex": "[ab]{2}-[0-9]{2,3}"}, "ignore_eos": False},
    ]
    plain = [dict(base) for _ in range(23)]
    rows = [{**base, **s} for s in special] + plain
    return [SamplingParams(**r) for r in rows]


def _run(model_dir: Any, device: str, **kw: Any) -> list[Any]:
    llm = LLM(str(model_dir), device=device, dtype="float32", max_num_batched_tokens=256, **kw)
    params = _params()
    prompts = random_prompts(512, len(params), 4, 60, seed=21)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0] for o in outs]


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
def test_gpu_equals_cpu_with_every_feature(llama_dir: Any, enforce_eager: bool) -> None:
    cpu = _run(llama_dir, "cpu")
    gpu = _run(llama_dir, "cuda", enforce_eager=enforce_eager, num_gpu_blocks=1024)
    for i, (c, g) in enumerate(zip(cpu, gpu, strict=True)):
        assert list(g.token_ids) == list(c.token_ids), f"row {i} differs"
        assert g.finish_reason == c.finish_reason, f"row {i}"
        if c.logprobs:
            for lc, lg in zip(c.logprobs, g.logprobs, strict=True):
                assert set(lc) == set(lg)
                for t in lc:
                    assert abs(lc[t].logprob - lg[t].logprob) < 1e-3
    json.loads(cpu[7].text)  # the JSON row really produced JSON (the grammar was applied)
