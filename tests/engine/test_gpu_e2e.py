"""GPU end to end: bf16 greedy output equals transformers' bf16 output, except at near-ties.

Where the two first diverge, transformers' own top-2 logprobs at that position must be within
bf16 rounding of each other; otherwise the engine computed something different.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.config import DEMO_MODEL_DIR
from tests.fixtures.tiny_models import random_prompts

pytestmark = pytest.mark.gpu
NEAR_TIE = 0.05  # top-2 logprob gap that bf16 rounding can flip


def _hf_greedy_bf16(model_dir: Path, prompts: list[list[int]], n: int) -> tuple[list, object]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    outs = []
    for p in prompts:
        ids = torch.tensor([p], device="cuda")
        with torch.no_grad():
            gen = model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)
        outs.append(gen[0, len(p) :].tolist())
    return outs, model


def _check(model_dir: Path, enforce_eager: bool, vocab: int) -> None:
    prompts = random_prompts(vocab, 16, 4, 300, seed=5, exclude=set(range(8)))
    n = 32
    llm = LLM(str(model_dir), dtype="bfloat16", enforce_eager=enforce_eager, block_size=16)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    ref, model = _hf_greedy_bf16(model_dir, prompts, n)
    exact = 0
    for p, o, r in zip(prompts, outs, ref, strict=True):
        got = o.outputs[0].token_ids
        if got == r:
            exact += 1
            continue
        i = next(j for j, (a, b) in enumerate(zip(got, r, strict=True)) if a != b)
        with torch.no_grad():
            logits = model(torch.tensor([p + r[:i]], device="cuda")).logits[0, -1].float()
        lp = torch.log_softmax(logits, -1)
        gap = (lp[r[i]] - lp[got[i]]).item()
        assert gap < NEAR_TIE, f"diverged at token {i} with a clear margin {gap:.3f}"
    assert exact >= len(prompts) // 2, f"only {exact}/{len(prompts)} prompts matched exactly"


@pytest.mark.parametrize("enforce_eager", [True, False], ids=["eager", "cuda-graphs"])
def test_tiny_models_bf16(tiny_models, enforce_eager) -> None:  # type: ignore[no-untyped-def]
    for arch in ("llama", "qwen3"):
        _check(tiny_models(arch), enforce_eager, 512)


@pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="no demo model")
def test_demo_model_bf16() -> None:
    import json

    vocab = json.loads((DEMO_MODEL_DIR / "config.json").read_text())["vocab_size"]
    _check(DEMO_MODEL_DIR, False, vocab)
