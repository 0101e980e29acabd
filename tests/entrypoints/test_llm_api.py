"""The offline API surface: prompt forms, chat, per-prompt params, CLI."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.entrypoints.cli import main


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:  # type: ignore[no-untyped-def]
    return LLM(str(llama_dir))


def test_prompt_forms_agree(llm, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    text = "def add(a, b):"
    ids = tiny_tokenizer.encode(text)
    by_text = llm.generate(text, params, use_tqdm=False)[0]
    by_ids = llm.generate(ids, params, use_tqdm=False)[0]
    by_dict = llm.generate([{"prompt": text}, {"prompt_token_ids": ids}], params, use_tqdm=False)
    assert by_text.prompt == text and by_text.prompt_token_ids == ids
    toks = by_text.outputs[0].token_ids
    assert by_ids.outputs[0].token_ids == toks
    assert [o.outputs[0].token_ids for o in by_dict] == [toks, toks]


def test_per_prompt_params_and_order(llm) -> None:  # type: ignore[no-untyped-def]
    outs = llm.generate(
        ["a", "b", "c"],
        [SamplingParams(max_tokens=k, ignore_eos=True) for k in (3, 1, 2)],
        use_tqdm=False,
    )
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 1, 2]
    with pytest.raises(ValueError, match="SamplingParams for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams()] * 2, use_tqdm=False)


def test_chat_uses_template(llm, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    out = llm.chat(msgs, params, use_tqdm=False)[0]
    ids = tiny_tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert out.prompt_token_ids == list(ids)
    two = llm.chat([msgs, msgs], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in two] == [out.outputs[0].token_ids] * 2


def test_chat_passes_tools_to_the_template(llm, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    template = (
        "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}{{ messages[0].content }}"
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    msgs = [{"role": "user", "content": "hi"}]
    params = SamplingParams(max_tokens=1)
    out = llm.chat(msgs, params, use_tqdm=False, chat_template=template, tools=tools)[0]
    assert tiny_tokenizer.decode(out.prompt_token_ids) == "[get_weather]hi"
    plain = llm.chat(msgs, params, use_tqdm=False, chat_template=template)[0]
    assert tiny_tokenizer.decode(plain.prompt_token_ids) == "hi"


def test_cli_generate(llama_dir, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["generate", str(llama_dir), "def f(x):", "--max-tokens", "4", "--ignore-eos"]) == 0
    captured = capsys.readouterr()
    assert "4 tokens" in captured.err and captured.out.strip() != ""
    assert main(["generate", str(llama_dir), "hi", "--max-tokens", "0"]) == 1
    assert "max_tokens" in capsys.readouterr().err
