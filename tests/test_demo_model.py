"""The bundled demo model (``pagedllm/assets/demo-model``) loads with plain transformers and works.

CPU only and fast: the model has ~7M parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEMO_DIR = Path(__file__).resolve().parents[1] / "pagedllm" / "assets" / "demo-model"
EXPECTED_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "training_log.json",
}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32).eval()


def test_files_and_size_limits() -> None:
    sizes = {p.name: p.stat().st_size for p in DEMO_DIR.iterdir() if p.is_file()}
    assert set(sizes) >= EXPECTED_FILES
    assert max(sizes.values()) < 15 * 2**20, sizes
    assert sum(sizes.values()) <= 30 * 10**6, sizes


def test_config_metadata() -> None:
    cfg = json.loads((DEMO_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # GQA
    assert cfg["tie_word_embeddings"] is True
    assert cfg.get("torch_dtype") == cfg.get("dtype") == "float16"
    gen = json.loads((DEMO_DIR / "generation_config.json").read_text())
    assert gen["bos_token_id"] == cfg["bos_token_id"]
    assert cfg["eos_token_id"] in gen["eos_token_id"]
    log = json.loads((DEMO_DIR / "training_log.json").read_text())
    assert log["best_val_loss"] < 3.0


def test_special_tokens(tokenizer) -> None:
    assert tokenizer.bos_token == "<|bos|>"
    assert tokenizer.eos_token == "<|endoftext|>"
    ids = tokenizer("def f(x):").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert len(tokenizer) == 4096
    for tok in ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]:
        assert len(tokenizer(tok, add_special_tokens=False).input_ids) == 1


@pytest.mark.parametrize(
    "text",
    [
        "héllo wörld — naïve café 日本語 🚀🐍 \u200b\x00",
        "def f(x):\r\n\tif x:\n        return '\\u00e9'  # ünïcödé\n",
        "   leading and trailing spaces   ",
    ],
)
def test_tokenizer_round_trips_unicode(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text


def test_chat_template(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Write hello world."},
        {"role": "assistant", "content": "print('hello world')"},
        {"role": "user", "content": "Now in a function."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nWrite hello world.<|end|>\n"
        "<|assistant|>\nprint('hello world')<|end|>\n<|user|>\nNow in a function.<|end|>\n"
        "<|assistant|>\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False)
    assert not no_prompt.endswith("<|assistant|>\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def _greedy(model, tokenizer, prompt: str, special: bool = True, n: int = 48) -> str:
    ids = tokenizer(prompt, add_special_tokens=special, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _mostly_printable(text: str) -> bool:
    good = sum(c.isprintable() or c in "\n\t" for c in text)
    return good >= 0.9 * len(text)


@pytest.mark.parametrize(
    "prompt", ["def fibonacci(n):\n", "import os\n\n\ndef list_python_files(root):\n"]
)
def test_greedy_code_completion(model, tokenizer, prompt: str) -> None:
    text = _greedy(model, tokenizer, prompt)
    assert text.strip(), f"empty completion for {prompt!r}"
    assert _mostly_printable(text), text


def test_greedy_chat_completion(model, tokenizer) -> None:
    messages = [{"role": "user", "content": "Write a Python function `add(a, b)`: Return a + b."}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = _greedy(model, tokenizer, prompt, special=False)
    assert "def " in text and _mostly_printable(text), text
