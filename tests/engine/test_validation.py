"""Bad input gets a precise ValueError, and nothing is left half-scheduled."""

from __future__ import annotations

import json
import shutil

import pytest

from pagedllm import LLM, SamplingParams


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n must be"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
        ({"logprobs": -1}, "logprobs"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_invalid_sampling_params(kw, needle) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=needle):
        SamplingParams(**kw)


def test_unsupported_architecture_names_supported_list(llama_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "gpt"
    shutil.copytree(llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        LLM(str(bad))


def test_missing_weights_named(llama_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    bare = tmp_path / "bare"
    shutil.copytree(llama_dir, bare, ignore=shutil.ignore_patterns("*.safetensors*"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(str(bare))
    LLM(str(bare), load_format="dummy")  # random weights of the real shapes need no files


def _assert_idle(llm: LLM) -> None:
    eng = llm.llm_engine
    assert not eng.has_unfinished_requests()
    pool = eng.scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_prompt_too_long_and_nothing_half_scheduled(llama_dir) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(str(llama_dir), max_model_len=64)
    good = {"prompt_token_ids": [5, 6, 7]}
    with pytest.raises(ValueError, match="max_model_len is 64"):
        llm.generate([good, {"prompt_token_ids": list(range(10, 74))}], use_tqdm=False)
    _assert_idle(llm)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="vocab size"):
        llm.generate({"prompt_token_ids": [10**6]}, use_tqdm=False)
    _assert_idle(llm)
    with pytest.raises(ValueError, match="min_tokens=70 cannot be reached"):
        llm.generate(good, SamplingParams(min_tokens=70, max_tokens=None), use_tqdm=False)
    _assert_idle(llm)
    # The engine still serves everyone else afterwards.
    out = llm.generate(good, SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


def test_request_that_can_never_fit_is_rejected(llama_dir) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(str(llama_dir), num_gpu_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="KV cache holds only 2 blocks"):
        llm.generate({"prompt_token_ids": [1] * 5}, SamplingParams(max_tokens=10), use_tqdm=False)
    _assert_idle(llm)
    out = llm.generate({"prompt_token_ids": [1] * 3}, SamplingParams(max_tokens=4), use_tqdm=False)
    assert out[0].finished


def test_max_model_len_caps_generation(llama_dir) -> None:  # type: ignore[no-untyped-def]
    llm = LLM(str(llama_dir), max_model_len=20)
    out = llm.generate(
        {"prompt_token_ids": list(range(5, 20))},
        SamplingParams(max_tokens=100, ignore_eos=True),
        use_tqdm=False,
    )[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"
