"""Bench workloads (random lengths, ShareGPT parsing) and the config-only model presets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pagedllm.bench.datasets import (
    parse_len_range,
    ratio_range,
    sample_random,
    sample_sharegpt,
    special_token_ids,
    workload_summary,
)
from pagedllm.bench.presets import (
    PRESETS,
    bench_engine_kwargs,
    is_synthetic_tokenizer,
    materialize_preset,
    preset_dir,
    synthetic_tokenizer_dir,
)
from pagedllm.config import EngineConfig
from pagedllm.core.kv_cache_spec import KVCacheSpec

SHARED_MODELS = Path(__file__).resolve().parents[3] / "shared" / "bench-models"


def test_ratio_range_and_parse() -> None:
    assert ratio_range(100, 0.5) == (50, 150)
    assert ratio_range(128, 0.0) == (128, 128)
    assert ratio_range(562, 0.82) == (101, 1022)
    assert ratio_range(1, 0.9) == (1, 1)
    assert parse_len_range("101:1023") == (101, 1023)
    assert parse_len_range("5,5") == (5, 5)
    for bad in ("9:3", "0:4", "7", "1:2:3"):
        with pytest.raises(ValueError):
            parse_len_range(bad)
    with pytest.raises(ValueError, match="range-ratio"):
        ratio_range(10, 1.0)


def test_random_lengths_respect_range_and_skip_special_ids() -> None:
    in_range, out_range = ratio_range(40, 0.5), (3, 7)
    reqs = sample_random(400, in_range, out_range, vocab_size=50, excluded_ids={0, 1, 2}, seed=3)
    in_lens = [r.prompt_len for r in reqs]
    out_lens = [r.output_len for r in reqs]
    assert min(in_lens) >= 20 and max(in_lens) <= 60
    assert min(out_lens) == 3 and max(out_lens) == 7  # both ends are reachable
    assert min(in_lens) <= 22 and max(in_lens) >= 58  # roughly uniform over the range
    ids = {t for r in reqs for t in r.prompt_token_ids}
    assert ids.isdisjoint({0, 1, 2}) and ids <= set(range(50)) and len(ids) == 47
    again = sample_random(400, in_range, out_range, vocab_size=50, excluded_ids={0, 1, 2}, seed=3)
    assert [r.prompt_token_ids for r in again] == [r.prompt_token_ids for r in reqs]
    summary = workload_summary(reqs)
    assert summary["num_requests"] == 400 and summary["total_output_tokens"] == sum(out_lens)


def test_sharegpt_parsing(tmp_path: Path, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    long_reply = "word " * 3000
    data = [
        {"conversations": [{"from": "human", "value": "def add(a, b): return a + b"},
                           {"from": "gpt", "value": "It adds two numbers a and b together."}]},
        {"conversations": [{"from": "gpt", "value": "Hello, how can I help you today?"},
                           {"from": "human", "value": "import os\nimport sys\nprint(os.name)"},
                           {"from": "gpt", "value": "It prints the name of the OS module."},
                           {"from": "human", "value": "ignored later turn"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"conversations": [{"from": "human", "value": "write a long essay please"},
                           {"from": "gpt", "value": long_reply}]},
        {"conversations": [{"from": "human", "value": "only a question"}]},
        {"id": "no conversations"},
    ]  # fmt: skip
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    reqs = sample_sharegpt(path, 10, tiny_tokenizer, seed=0)
    by_prompt = {r.prompt: r for r in reqs}
    assert set(by_prompt) == {
        "def add(a, b): return a + b",
        "import os\nimport sys\nprint(os.name)",
    }
    for r in reqs:
        assert r.prompt_token_ids == tiny_tokenizer(r.prompt).input_ids
    reply = "It prints the name of the OS module."
    expected = len(tiny_tokenizer(reply, add_special_tokens=False).input_ids)
    assert by_prompt["import os\nimport sys\nprint(os.name)"].output_len == expected
    fixed = sample_sharegpt(path, 1, tiny_tokenizer, seed=0, output_len=5)
    assert len(fixed) == 1 and fixed[0].output_len == 5
    with pytest.raises(ValueError, match="no usable"):
        sample_sharegpt(path, 10, tiny_tokenizer, max_model_len=8)


def test_special_token_ids(tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    assert {0, 1} <= special_token_ids(tiny_tokenizer)


# Architecture numbers of the real models: (layers, kv heads, head_dim, hidden, vocab).
_EXPECTED = {
    "llama-3-8b": (32, 8, 128, 4096, 128256),
    "qwen3-0.6b": (28, 8, 128, 1024, 151936),
    "qwen2.5-7b": (28, 4, 128, 3584, 152064),
    "llama-3-70b": (80, 8, 128, 8192, 128256),
}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_configs_validate_as_dummy(name: str) -> None:
    for dtype, elem in (("float32", 4), ("bfloat16", 2)):
        cfg = EngineConfig(
            model=str(preset_dir(name)), load_format="dummy", device="cpu", dtype=dtype
        )
        layers, kv_heads, head_dim, hidden, vocab = _EXPECTED[name]
        mc = cfg.model_config.arch
        assert (mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim) == _EXPECTED[name][:3]
        assert (mc.hidden_size, mc.vocab_size) == (hidden, vocab)
        spec = KVCacheSpec.from_config(cfg)
        assert spec.bytes_per_block == 2 * layers * 16 * kv_heads * head_dim * elem
    shared = SHARED_MODELS / name / "config.json"
    if shared.is_file():  # the committed copy keeps the shared bench model's numbers
        ours = json.loads((preset_dir(name) / "config.json").read_text())
        theirs = json.loads(shared.read_text())
        theirs.pop("layer_types", None)
        assert ours == theirs


def test_qwen25_preset_numbers() -> None:
    mc = EngineConfig(model=str(preset_dir("qwen2.5-7b")), load_format="dummy").model_config.arch
    assert mc.architecture == "Qwen2ForCausalLM"
    assert (mc.intermediate_size, mc.num_attention_heads, mc.max_position_embeddings) == (
        18944,
        28,
        32768,
    )
    assert (mc.rope_theta, mc.rms_norm_eps, mc.tie_word_embeddings) == (1e6, 1e-6, False)


def test_llama3_70b_preset_numbers() -> None:
    """Llama-3.1-70B's architecture (issue 16): 64 heads, Llama-3 rope scaling to 128k."""
    cfg = EngineConfig(
        model=str(preset_dir("llama-3-70b")), load_format="dummy", max_model_len=32768
    )
    mc = cfg.model_config.arch
    assert mc.architecture == "LlamaForCausalLM"
    assert (mc.intermediate_size, mc.num_attention_heads, mc.max_position_embeddings) == (
        28672,
        64,
        131072,
    )
    assert mc.rope_theta == 500000.0
    assert mc.rope_scaling is not None and mc.rope_scaling["rope_type"] == "llama3"
    assert mc.rope_scaling["factor"] == 8.0


def test_materialized_preset_has_synthetic_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model_dir = materialize_preset("llama-3-8b", tmp_path)
    assert materialize_preset("llama-3-8b", tmp_path) == model_dir  # cached
    tok_dir = synthetic_tokenizer_dir(model_dir)
    assert is_synthetic_tokenizer(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    assert len(tok) == 128256 and tok.eos_token_id == 1 and tok.bos_token_id == 0
    assert tok.decode([5, 6, 7]) == "t5 t6 t7"
    cfg = EngineConfig(model=str(model_dir), tokenizer=str(tok_dir), load_format="dummy")
    assert cfg.model_config.arch.vocab_size == 128256


def test_bench_engine_kwargs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pagedllm.entrypoints.cli import build_parser

    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path))
    parse = build_parser().parse_args
    args = parse(["bench", "latency", "--model-config", "qwen3-0.6b", "--dtype", "bfloat16"])
    kw = bench_engine_kwargs(args)
    assert kw["load_format"] == "dummy" and is_synthetic_tokenizer(kw["tokenizer"])
    assert Path(kw["model"]).parent.parent == tmp_path and kw["dtype"] == "bfloat16"
    args = parse(
        ["bench", "latency", "--model-config", "qwen3-0.6b", "--load-format", "safetensors"]
    )
    with pytest.raises(ValueError, match="no weights"):
        bench_engine_kwargs(args)
    both = argparse.Namespace(**{**vars(args), "model_flag": "x", "load_format": "dummy"})
    with pytest.raises(ValueError, match="not both"):
        bench_engine_kwargs(both)
