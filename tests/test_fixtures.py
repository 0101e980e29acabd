"""Sanity checks for the tiny tokenizer/model fixtures and the transformers reference helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import TinyModelFactory
from tests.fixtures import tiny_models as tm

UNICODE_TEXT = "你好，世界！Ça va très bien 😀🚀 — Привет, мир. def f(x): return x"


@pytest.mark.parametrize("tiny_model_dir", tm.ARCHES, indirect=True)
def test_arch_loads(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    files = {p.name for p in tiny_model_dir.iterdir()}
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert name in files
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.vocab_size == len(tok) == tm.VOCAB_SIZE
    assert config.max_position_embeddings >= 512
    assert config.bos_token_id == tok.bos_token_id == tm.BOS_TOKEN_ID
    assert config.eos_token_id == tok.eos_token_id == tm.EOS_TOKEN_ID
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (tm.BOS_TOKEN_ID, tm.EOS_TOKEN_ID)
    assert next(model.parameters()).dtype == torch.float32
    # RMSNorm weights are perturbed away from 1.
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert norms and all((p - 1).abs().max() > 0.05 for p in norms)
    out = model(input_ids=torch.tensor([tok("hello world").input_ids]))
    assert torch.isfinite(out.logits).all()


def test_arch_details(tiny_models: TinyModelFactory) -> None:
    from transformers import AutoConfig

    q3 = AutoConfig.from_pretrained(tiny_models("qwen3"))
    assert q3.head_dim * q3.num_attention_heads != q3.hidden_size
    assert AutoConfig.from_pretrained(tiny_models("llama3")).tie_word_embeddings
    assert not AutoConfig.from_pretrained(tiny_models("llama")).tie_word_embeddings
    untied = AutoConfig.from_pretrained(tiny_models("llama3", tie_word_embeddings=False))
    assert not untied.tie_word_embeddings


def test_deterministic(
    tiny_models: TinyModelFactory, tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    from safetensors.torch import load_file

    again = tm.build_tiny_model(tmp_path / "m", "qwen2", tokenizer_dir=tiny_tokenizer_dir)
    a = load_file(tiny_models("qwen2") / "model.safetensors")
    b = load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = load_file(tiny_models("qwen2", seed=1) / "model.safetensors")
    assert not torch.equal(a["model.embed_tokens.weight"], other["model.embed_tokens.weight"])


def test_sharded(tiny_models: TinyModelFactory) -> None:
    from transformers import AutoModelForCausalLM

    d = tiny_models("llama", sharded=True)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((d / s).exists() for s in shards)
    assert not (d / "model.safetensors").exists()
    sharded = AutoModelForCausalLM.from_pretrained(d).state_dict()
    plain = AutoModelForCausalLM.from_pretrained(tiny_models("llama")).state_dict()
    assert all(torch.equal(sharded[k], plain[k]) for k in plain)


def _plain_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


@pytest.mark.parametrize("config_style", ["v5", "legacy"])
def test_llama3_rope_scaling_active(tiny_models: TinyModelFactory, config_style: str) -> None:
    d = tiny_models("llama3", config_style=config_style)
    raw = json.loads((d / "config.json").read_text())
    if config_style == "legacy":
        assert "rope_parameters" not in raw and raw["rope_scaling"]["rope_type"] == "llama3"
        assert raw["rope_theta"] == 500000.0
    else:
        assert raw["rope_parameters"]["rope_type"] == "llama3"
    model = tm.load_hf_model(d)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    inv_freq = model.model.rotary_emb.inv_freq
    plain = _plain_inv_freq(500000.0, head_dim)
    assert not torch.allclose(inv_freq, plain)
    # High frequencies untouched, lowest frequency divided by the factor.
    assert torch.allclose(inv_freq[0], plain[0])
    assert torch.allclose(inv_freq[-1], plain[-1] / 8.0)
    # Plain llama really is plain rope.
    llama = tm.load_hf_model(tiny_models("llama"))
    assert torch.allclose(llama.model.rotary_emb.inv_freq, _plain_inv_freq(10000.0, head_dim))


def test_legacy_config_matches_v5(tiny_models: TinyModelFactory) -> None:
    ids = [tm.BOS_TOKEN_ID, 100, 200, 300, 400]
    for arch in ("llama", "llama3"):
        a = tm.hf_logprobs(tiny_models(arch), ids)
        b = tm.hf_logprobs(tiny_models(arch, config_style="legacy"), ids)
        torch.testing.assert_close(a, b)


def test_qwen2_biases_nonzero(tiny_models: TinyModelFactory) -> None:
    model = tm.load_hf_model(tiny_models("qwen2"))
    biases = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}
    assert {n.rsplit(".", 2)[-2] for n in biases} == {"q_proj", "k_proj", "v_proj"}
    assert all((p != 0).all() and p.abs().mean() > 0.05 for p in biases.values())


def test_qwen3_qk_norm_random(tiny_models: TinyModelFactory) -> None:
    model = tm.load_hf_model(tiny_models("qwen3"))
    qk = [p for n, p in model.named_parameters() if n.endswith(("q_norm.weight", "k_norm.weight"))]
    assert len(qk) == 2 * model.config.num_hidden_layers
    assert all(p.numel() == 32 and p.std() > 0.1 for p in qk)


def test_chat_template(tiny_tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|bos|><|system|>\nBe brief.<|end|>\n<|user|>\nHi!<|end|>\n"
        "<|assistant|>\nHello.<|end|>\n<|user|>\nBye<|end|>\n<|assistant|>\n"
    )
    no_prompt = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert not no_prompt.endswith("<|assistant|>\n")
    ids = tiny_tokenizer(text, add_special_tokens=False).input_ids
    assert ids[0] == tm.BOS_TOKEN_ID and ids[1] == tm.SPECIAL_TOKEN_IDS["<|system|>"]
    assert ids.count(tm.BOS_TOKEN_ID) == 1 and ids.count(tm.END_TOKEN_ID) == 4


def test_tokenizer_basics(tiny_tokenizer: Any) -> None:
    for name, idx in tm.SPECIAL_TOKEN_IDS.items():
        assert tiny_tokenizer.convert_tokens_to_ids(name) == idx
    assert len(tiny_tokenizer) == tm.VOCAB_SIZE
    assert tiny_tokenizer.pad_token_id is None
    ids = tiny_tokenizer("x = 1").input_ids
    assert ids[0] == tm.BOS_TOKEN_ID and tm.BOS_TOKEN_ID not in ids[1:]
    assert tiny_tokenizer("x = 1", add_special_tokens=False).input_ids == ids[1:]


def test_tokenizer_unicode_roundtrip(tiny_tokenizer: Any, tiny_tokenizer_dir: Path) -> None:
    ids = tiny_tokenizer(UNICODE_TEXT, add_special_tokens=False).input_ids
    assert tiny_tokenizer.decode(ids) == UNICODE_TEXT
    table = tm.token_bytes(tiny_tokenizer_dir)
    assert b"".join(table[i] for i in ids) == UNICODE_TEXT.encode("utf-8")

    def incomplete(i: int) -> bool:
        try:
            table[i].decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False

    partial = [i for i in ids if incomplete(i)]
    assert partial, "expected some tokens holding partial UTF-8 characters"
    assert all("\ufffd" in tiny_tokenizer.decode([i]) for i in partial)
    # Some learned merges (not just single bytes) are themselves partial characters.
    assert any(len(table[i]) >= 2 for i in partial)


def test_random_prompts() -> None:
    prompts = tm.random_prompts(tm.VOCAB_SIZE, 50, 3, 9, seed=7)
    assert prompts == tm.random_prompts(tm.VOCAB_SIZE, 50, 3, 9, seed=7)
    assert len(prompts) == 50 and all(3 <= len(p) <= 9 for p in prompts)
    flat = {t for p in prompts for t in p}
    assert not flat & set(tm.SPECIAL_TOKEN_IDS.values())
    assert max(flat) < tm.VOCAB_SIZE


def test_hf_greedy_matches_logprobs_and_gap_is_large(llama_dir: Path) -> None:
    prompts = tm.random_prompts(tm.VOCAB_SIZE, 8, 4, 24, seed=0)
    outs = tm.hf_greedy(llama_dir, prompts, 32)
    min_gap = float("inf")
    for prompt, out in zip(prompts, outs, strict=True):
        assert len(out) == 32
        lp = tm.hf_logprobs(llama_dir, prompt + out)
        assert lp.shape == (len(prompt) + 32, tm.VOCAB_SIZE) and lp.dtype == torch.float32
        steps = lp[len(prompt) - 1 : -1]
        assert steps.argmax(-1).tolist() == out
        top2 = steps.topk(2, dim=-1).values
        min_gap = min(min_gap, (top2[:, 0] - top2[:, 1]).min().item())
    print(f"llama min top1-top2 logprob gap over 8x32 greedy steps: {min_gap:.4f}")
    assert min_gap > 1e-3
    # Outputs are not degenerate.
    assert sum(len(set(o)) for o in outs) / len(outs) > 16


def test_hf_greedy_ignores_eos(llama_dir: Path) -> None:
    model = tm.load_hf_model(llama_dir)

    def force_eos(_m: torch.nn.Module, _inp: Any, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[..., tm.EOS_TOKEN_ID] += 1e4
        return out

    handle = model.lm_head.register_forward_hook(force_eos)
    try:
        outs = tm.hf_greedy(llama_dir, [[10, 20, 30], [40]], 5)
    finally:
        handle.remove()
    assert outs == [[tm.EOS_TOKEN_ID] * 5] * 2
    assert len(tm.hf_greedy(llama_dir, [[10, 20, 30]], 0)[0]) == 0
