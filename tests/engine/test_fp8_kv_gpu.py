"""GPU end to end with an fp8 KV cache: the Triton engine (fused write, paged attention, CUDA
graphs) against the torch reference backend on the same GPU, and start-up calibration.

With the checkpoint's scales (so both engines use the very same ones) and fp32 activations,
the Triton kernels store the same fp8 bytes as the reference (up to a rare one-code flip where
the fused rotary's fp32 rounding differs) and attend in IEEE fp32, so greedy output must be
equal token for token, as ``test_gpu_e2e`` demands of the unquantized cache against
transformers. Without checkpoint scales the CUDA profiling pass calibrates them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pagedllm import LLM, SamplingParams
from tests.fixtures.tiny_models import random_prompts

pytestmark = pytest.mark.gpu
NEW = 24


def _greedy(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_triton_fp8_equals_reference_backend(
    tiny_models, tmp_path: Path, kv_cache_dtype: str
) -> None:  # type: ignore[no-untyped-def]
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_models("llama"), model_dir)
    scales = {}
    for i in range(2):
        scales[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.02 + i / 100)
        scales[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.015)
    save_file(scales, str(model_dir / "kv_scales.safetensors"))
    prompts = random_prompts(512, 12, 1, 200, seed=7)
    kw = dict(dtype="float32", kv_cache_dtype=kv_cache_dtype, num_gpu_blocks=1024)
    ref = LLM(str(model_dir), attention_backend="torch_native", enforce_eager=True, **kw)
    expected = _greedy(ref, prompts)
    del ref
    llm = LLM(str(model_dir), **kw)  # Triton, CUDA graphs
    assert llm.llm_engine.runner.graphs is not None
    layers = llm.llm_engine.runner.attn_layers
    assert [a.kv_scale_source for a in layers] == ["checkpoint", "checkpoint"]
    assert layers[0].kv_cache.element_size() == 1 and layers[0].kv_scale.is_cuda
    assert _greedy(llm, prompts) == expected


def test_profiling_pass_calibrates(tiny_models) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(
        str(tiny_models("qwen3")), dtype="bfloat16", kv_cache_dtype="fp8",
        gpu_memory_utilization=0.2, max_model_len=512, max_num_batched_tokens=512,
    )  # fmt: skip
    runner = llm.llm_engine.runner
    assert {a.kv_scale_source for a in runner.attn_layers} == {"calibrated"}
    for a in runner.attn_layers:
        assert ((a.kv_scale > 0) & (a.kv_scale != 1.0)).all()
    prompts = random_prompts(512, 8, 1, 200, seed=8)
    got = _greedy(llm, prompts)  # decode steps replay CUDA graphs reading these scales
    assert all(len(g) == NEW for g in got)
