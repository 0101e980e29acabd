"""Qwen2-VL and Qwen2.5-VL on the GPU: fp32 greedy equals transformers' CPU output token for
token, eager and with CUDA graphs (decode steps replay graphs with M-RoPE ids shifted to 1D),
through the GPU attention backend's plain KV write + attention (the model applies M-RoPE
itself); bf16 runs the same prompts to completion."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedllm import LLM, SamplingParams
from tests.fixtures.tiny_vl_models import VL_ARCHES, build_tiny_vl_model, hf_vl_greedy, make_image
from tests.models.test_qwen2_vl import CASES

pytestmark = pytest.mark.gpu
NEW = 16


@pytest.fixture(scope="module", params=VL_ARCHES)
def vl_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    arch = request.param
    return build_tiny_vl_model(tmp_path_factory.mktemp(f"tiny_{arch}_gpu"), arch=arch)


def _run(vl_dir: Path, **kw: object) -> tuple[list, list]:
    llm = LLM(str(vl_dir), num_gpu_blocks=256, max_model_len=256, **kw)
    prompts, images = [], []
    for text, specs in CASES:
        imgs = [make_image(*s) for s in specs]
        images.append(imgs)
        prompts.append({"prompt": text, "multi_modal_data": {"image": imgs}} if imgs else text)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return outs, images


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
@pytest.mark.parametrize("chunk", [None, 6], ids=["whole", "chunked"])
def test_fp32_equals_transformers(vl_dir: Path, enforce_eager: bool, chunk: int | None) -> None:
    kw: dict[str, object] = {"dtype": "float32", "enforce_eager": enforce_eager}
    if chunk is not None:
        kw["max_num_batched_tokens"] = chunk
        kw["max_num_seqs"] = 4
    outs, images = _run(vl_dir, **kw)
    for out, (text, _), imgs in zip(outs, CASES, images, strict=True):
        ids, new = hf_vl_greedy(vl_dir, "<|bos|>" + text, imgs, NEW)
        assert out.prompt_token_ids == ids
        assert list(out.outputs[0].token_ids) == new


def test_bf16_runs(vl_dir: Path) -> None:
    outs, _ = _run(vl_dir, dtype="bfloat16")
    assert [len(o.outputs[0].token_ids) for o in outs] == [NEW] * len(CASES)
