"""Steps that yield several tokens per sequence (as speculative decoding will) go through the
scheduler, the output processor and the detokenizer: every token is kept in order, the text is
the decoding of all of them, and ``max_tokens`` or a stop token in the middle of a step's tokens
ends the sequence there."""

from __future__ import annotations

from typing import Any

from pagedllm import LLM, SamplingParams
from pagedllm.core.scheduler_output import ModelRunnerOutput
from tests.fixtures.tiny_models import random_prompts


class _TwoTokens:
    """Wraps a handle: each sampled sequence also gets a made-up second token."""

    def __init__(self, handle: Any, vocab: int, log: list[int]) -> None:
        self.handle, self.vocab, self.log = handle, vocab, log

    def get(self) -> ModelRunnerOutput:
        out = self.handle.get()
        for tokens in out.sampled.values():
            tokens.append((tokens[0] * 7 + 3) % self.vocab)
            self.log.append(len(tokens))
        for entries in out.logprobs.values():
            entries.append(entries[0])
        return out


def _llm_with_two_tokens(llama_dir: Any) -> tuple[LLM, list[int]]:
    llm = LLM(str(llama_dir), async_scheduling=False)
    runner = llm.llm_engine.runner
    inner = runner.execute_async
    log: list[int] = []
    runner.execute_async = lambda step: _TwoTokens(inner(step), runner.vocab_size, log)
    return llm, log


def test_two_tokens_per_step(llama_dir: Any, tiny_tokenizer: Any) -> None:
    llm, log = _llm_with_two_tokens(llama_dir)
    prompts = random_prompts(len(tiny_tokenizer), 3, 4, 12, seed=9)
    params = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert log and set(log) == {2}
    steps_per_seq = len(log) // len(prompts)
    assert steps_per_seq == 5  # 9 tokens at two per step: the fifth step's second is dropped
    for out in outs:
        c = out.outputs[0]
        assert len(c.token_ids) == 9 and c.finish_reason == "length"
        for a, b in zip(c.token_ids[::2], c.token_ids[1::2], strict=False):
            assert b == (a * 7 + 3) % len(tiny_tokenizer)  # the made-up token follows its pair
        assert c.text == tiny_tokenizer.decode(c.token_ids)
        assert c.logprobs is not None and len(c.logprobs) == 9


def test_stop_token_inside_a_step_ends_there(llama_dir: Any, tiny_tokenizer: Any) -> None:
    llm, _ = _llm_with_two_tokens(llama_dir)
    prompt = random_prompts(len(tiny_tokenizer), 1, 6, 6, seed=3)[0]
    free = llm.generate(
        {"prompt_token_ids": prompt},
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    stop = free.token_ids[3]  # the second token of the second step
    assert stop not in free.token_ids[:3]
    got = llm.generate(
        {"prompt_token_ids": prompt},
        SamplingParams(temperature=0.0, max_tokens=8, stop_token_ids=[stop]),
        use_tqdm=False,
    )[0].outputs[0]
    assert got.token_ids == free.token_ids[:4]
    assert got.finish_reason == "stop" and got.stop_reason == stop
    assert (
        llm.llm_engine.scheduler.kv.pool.num_free_blocks
        == llm.llm_engine.scheduler.kv.pool.num_blocks
    )
