"""The bundled demo model: pagedllm's greedy completions equal transformers' on code prompts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagedllm import LLM, SamplingParams
from pagedllm.config import DEMO_MODEL_DIR

PROMPTS = [
    "def fibonacci(n):",
    "import os\n\ndef list_python_files(root):",
    "class Stack:\n    def __init__(self):",
    "    for i, line in enumerate(",
]
NEW = 32


@pytest.fixture(scope="module")
def hf_outputs() -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()
    outs = []
    for text in PROMPTS:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, do_sample=False, max_new_tokens=NEW)
        outs.append(gen[0, ids.shape[1] :].tolist())
    return outs


def test_default_model_is_the_demo_model() -> None:
    llm = LLM()
    assert llm.llm_engine.config.model_config.model == str(DEMO_MODEL_DIR)


def test_greedy_matches_transformers(hf_outputs) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(max_num_batched_tokens=16)  # chunked prefill on the way
    params = SamplingParams(temperature=0.0, max_tokens=NEW)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    eos = {0, 6}
    for out, ref in zip(outs, hf_outputs, strict=True):
        ref = ref[: next((i + 1 for i, t in enumerate(ref) if t in eos), len(ref))]
        assert out.outputs[0].token_ids == ref
    assert any(len(o.outputs[0].text) > 20 for o in outs)
