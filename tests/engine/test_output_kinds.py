"""DELTA outputs (streaming) add up to the CUMULATIVE result; FINAL_ONLY emits once."""

from __future__ import annotations

import pytest

from pagedllm import LLM, RequestOutputKind, SamplingParams
from tests.fixtures.tiny_models import random_prompts


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:  # type: ignore[no-untyped-def]
    return LLM(str(llama_dir))


def _drain(llm: LLM, prompt: list[int], params: SamplingParams) -> list:  # type: ignore[type-arg]
    engine = llm.llm_engine
    rid = engine.add_request(None, prompt, params)
    outs = []
    while engine.has_unfinished_requests():
        outs.extend(o for o in engine.step() if o.request_id == rid)
    return outs


@pytest.mark.parametrize("n", [1, 2])
def test_delta_outputs_add_up(llm, tiny_tokenizer, n) -> None:  # type: ignore[no-untyped-def]
    prompt = random_prompts(len(tiny_tokenizer), 1, 5, 5, seed=9)[0]
    kw = dict(n=n, temperature=0.9, seed=4, max_tokens=24, ignore_eos=True)
    cum = _drain(llm, prompt, SamplingParams(**kw))[-1]
    final_text = cum.outputs[0].text
    stop = final_text[6:9]
    deltas = _drain(llm, prompt, SamplingParams(output_kind=RequestOutputKind.DELTA, **kw))
    assert len(deltas) > 3 and deltas[-1].finished and not any(d.finished for d in deltas[:-1])
    for idx in range(n):
        parts = [c for d in deltas for c in d.outputs if c.index == idx]
        assert "".join(c.text for c in parts) == cum.outputs[idx].text
        assert sum((c.token_ids for c in parts), []) == cum.outputs[idx].token_ids
    # With a stop string, no streamed piece ever contains text that is later cut.
    stopped = _drain(
        llm, prompt, SamplingParams(output_kind=RequestOutputKind.DELTA, stop=[stop], **kw)
    )
    streamed = "".join(c.text for d in stopped for c in d.outputs if c.index == 0)
    assert streamed == final_text[: final_text.index(stop)]


def test_final_only_emits_once(llm) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(max_tokens=5, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    outs = _drain(llm, [3, 4, 5], params)
    assert len(outs) == 1 and outs[0].finished and len(outs[0].outputs[0].token_ids) == 5
