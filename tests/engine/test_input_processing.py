"""`InputProcessor`: tokenization, every request check with its message, and that the engine and
``LLM`` route their requests through it."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pagedllm import LLM, EngineConfig, SamplingParams
from pagedllm.engine.input_processing import InputProcessor, ProcessedInput

MAX_LEN = 64


@pytest.fixture(scope="module")
def fcfs(llama_dir: Path, tiny_tokenizer: Any) -> InputProcessor:
    config = EngineConfig(model=str(llama_dir), device="cpu", max_model_len=MAX_LEN)
    return InputProcessor(config, tiny_tokenizer)


@pytest.fixture(scope="module")
def by_priority(llama_dir: Path, tiny_tokenizer: Any) -> InputProcessor:
    config = EngineConfig(model=str(llama_dir), device="cpu", scheduling_policy="priority")
    return InputProcessor(config, tiny_tokenizer)


def test_limits_come_from_the_config(fcfs: InputProcessor) -> None:
    assert fcfs.max_model_len == MAX_LEN
    assert fcfs.vocab_size == fcfs.config.model_config.arch.vocab_size
    assert fcfs.in_vocab([0, fcfs.vocab_size - 1]) and fcfs.in_vocab([])
    assert not fcfs.in_vocab([fcfs.vocab_size]) and not fcfs.in_vocab([-1])


def test_text_and_token_prompts(fcfs: InputProcessor, tiny_tokenizer: Any) -> None:
    text = "def f(x): return x"
    out = fcfs.process(text, SamplingParams(max_tokens=5))
    assert out == ProcessedInput(list(tiny_tokenizer.encode(text)), 5)
    assert fcfs.tokenize((5, 6, True)) == [5, 6, 1]  # any int-like sequence, copied as ints


@pytest.mark.parametrize(
    "n_prompt,max_tokens,effective",
    [(3, 5, 5), (3, None, MAX_LEN - 3), (3, 1000, MAX_LEN - 3), (MAX_LEN - 1, 9, 1)],
)
def test_effective_max_tokens(
    fcfs: InputProcessor, n_prompt: int, max_tokens: int | None, effective: int
) -> None:
    out = fcfs.process([7] * n_prompt, SamplingParams(max_tokens=max_tokens))
    assert out.max_tokens == effective and out.prompt_token_ids == [7] * n_prompt


# Each case, given the vocab size v: (prompt, SamplingParams keywords, today's exact message).
INVALID: list[Callable[[int], tuple[list[int], dict[str, Any], str]]] = [
    lambda v: ([], {}, "The prompt is empty; at least one prompt token is required."),
    lambda v: ([5, -1], {}, f"Prompt token ids must be in [0, {v}) (the model's vocab size)."),
    lambda v: ([5, v], {}, f"Prompt token ids must be in [0, {v}) (the model's vocab size)."),
    lambda v: (
        [5] * MAX_LEN,
        {},
        f"The prompt has {MAX_LEN} tokens, but max_model_len is {MAX_LEN}: prompts may have "
        f"at most {MAX_LEN - 1} tokens to leave room for output.",
    ),
    lambda v: ([5], {"logprobs": v + 1}, f"logprobs={v + 1} exceeds the vocabulary size ({v})."),
    lambda v: (
        [5],
        {"prompt_logprobs": v + 1},
        f"prompt_logprobs={v + 1} exceeds the vocabulary size ({v}).",
    ),
    lambda v: (
        [5],
        {"logit_bias": {v: 1.0}},
        f"logit_bias token ids must be in [0, {v}) (the model's vocab size).",
    ),
    lambda v: (
        [5] * 10,
        {"min_tokens": MAX_LEN - 9, "max_tokens": None},
        f"min_tokens={MAX_LEN - 9} cannot be reached: the prompt has 10 tokens and "
        f"max_model_len is {MAX_LEN}.",
    ),
]


@pytest.mark.parametrize("case", range(len(INVALID)))
def test_invalid_requests(fcfs: InputProcessor, case: int) -> None:
    prompt, kw, message = INVALID[case](fcfs.vocab_size)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        fcfs.process(prompt, SamplingParams(**kw))


def test_limits_are_inclusive(fcfs: InputProcessor) -> None:
    v = fcfs.vocab_size
    params = SamplingParams(min_tokens=1, logprobs=v, prompt_logprobs=v, logit_bias={v - 1: 1.0})
    assert fcfs.process([v - 1] * (MAX_LEN - 1), params).max_tokens == 1


def test_priority_needs_the_priority_policy(
    fcfs: InputProcessor, by_priority: InputProcessor
) -> None:
    fcfs.check_priority(0)
    for p in (-5, 0, 7):
        by_priority.check_priority(p)
        assert by_priority.process([5], SamplingParams(), priority=p).prompt_token_ids == [5]
    message = (
        "Got priority -1 but priority scheduling is not enabled (--scheduling-policy priority)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        fcfs.check_priority(-1)
    with pytest.raises(ValueError, match="Got priority 3 but"):
        fcfs.process([5], SamplingParams(), priority=3)


def test_priority_is_checked_before_tokenizing(fcfs: InputProcessor) -> None:
    class NoTokenizer:
        def encode(self, text: str) -> list[int]:
            raise AssertionError("tokenized a request whose priority is refused")

    processor = InputProcessor(fcfs.config, NoTokenizer())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="priority"):
        processor.process("some text", SamplingParams(), priority=1)


class _Stricter(InputProcessor):
    """Refuses prompts longer than 3 tokens: shows who asks the processor."""

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> int:
        if len(prompt_ids) > 3:
            raise ValueError("stricter: at most 3 prompt tokens")
        return super().check_prompt(prompt_ids, params)

    def check_priority(self, priority: int) -> None:
        if priority == 9:
            raise ValueError("stricter: not 9")
        super().check_priority(priority)


def test_the_engine_and_llm_route_requests_through_it(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), device="cpu", scheduling_policy="priority")
    engine = llm.llm_engine
    engine.input_processor = _Stricter(engine.config, engine.tokenizer)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    with pytest.raises(ValueError, match="stricter: at most 3"):
        engine.add_request(None, [5, 6, 7, 8], params)
    with pytest.raises(ValueError, match="stricter: at most 3"):
        llm.generate([[5, 6], [5, 6, 7, 8]], params, use_tqdm=False)
    with pytest.raises(ValueError, match="stricter: not 9"):  # LLM checks all before queuing
        llm.generate([[5, 6], [7, 8]], params, use_tqdm=False, priority=[0, 9])
    assert not engine.has_unfinished_requests()
    out = llm.generate([[5, 6, 7]], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
