"""Structured output through the engine (CPU, tiny random model and the bundled demo model).

Greedy constrained output must equal a reference that runs the Hugging Face model step by step
and applies the same grammar's mask in plain torch; sampled outputs must satisfy their
constraint; constrained sequences must not change what unconstrained neighbours produce
(async scheduling included); a bad constraint is a ValueError that queues nothing.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import jsonschema
import llguidance
import llguidance.hf
import llguidance.numpy
import numpy as np
import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.structured_output import StructuredOutputsParams
from pagedllm.structured_output.backend import bitmask_width
from pagedllm.structured_output.llguidance_backend import grammar_text
from pagedllm.structured_output.manager import COMPILE_TIMEOUT_S
from tests.fixtures.tiny_models import random_prompts

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["bug", "question"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "kind", "n"],
    "additionalProperties": False,
}
CONSTRAINTS = {
    "json": {"json": SCHEMA, "disable_any_whitespace": True},
    "regex": {"regex": "[ab]{2}-[0-9]{2,3}"},
    "choice": {"choice": ["alpha", "beta", "gamma delta"]},
    "grammar": {"grammar": 'start: "yes" | "no" | "maybe " NUM\nNUM: /[0-9]/'},
}


def _check(kind: str, text: str) -> None:
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(CONSTRAINTS["regex"]["regex"], text), text
    elif kind == "choice":
        assert text in CONSTRAINTS["choice"]["choice"], text
    else:
        assert re.fullmatch(r"yes|no|maybe [0-9]", text), text


@pytest.fixture(scope="module")
def llm(llama_dir: Any) -> LLM:
    return LLM(str(llama_dir))


def _reference(model_dir: Any, prompt: list[int], so: dict, max_tokens: int) -> list[int]:
    """Greedy decoding with transformers, masking the logits with an independent llguidance
    matcher of the same grammar."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    eos = tok.eos_token_id
    ll_tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=[eos])
    matcher = llguidance.LLMatcher(ll_tok, grammar_text(StructuredOutputsParams(**so)))
    bitmask = np.zeros((1, bitmask_width(vocab)), dtype=np.int32)
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            bitmask[:] = 0
            llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, 0)
            bits = torch.from_numpy(bitmask[0]).unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)
            allowed = (bits & 1).bool().flatten()[:vocab]
            token = int(logits.masked_fill(~allowed, float("-inf")).argmax())
            out.append(token)
            ids.append(token)
            assert matcher.consume_token(token)
            if token == eos or matcher.is_stopped():
                break
    return out


@pytest.mark.parametrize("kind", list(CONSTRAINTS))
def test_greedy_equals_masked_reference(llm: LLM, llama_dir: Any, tiny_tokenizer: Any, kind: str):
    prompts = random_prompts(len(tiny_tokenizer), 3, 4, 16, seed=11)
    params = SamplingParams(temperature=0.0, max_tokens=40, structured_outputs=CONSTRAINTS[kind])
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        got = out.outputs[0]
        assert list(got.token_ids) == _reference(llama_dir, prompt, CONSTRAINTS[kind], 40)
        if got.finish_reason == "stop":
            _check(kind, got.text)


@pytest.mark.parametrize("kind", list(CONSTRAINTS))
def test_sampled_outputs_satisfy_the_constraint(llm: LLM, kind: str) -> None:
    params = SamplingParams(
        n=3, temperature=1.0, seed=5, max_tokens=60, structured_outputs=CONSTRAINTS[kind]
    )
    outs = llm.generate(["first prompt", "a second one"], params, use_tqdm=False)
    finished = 0
    for out in outs:
        for c in out.outputs:
            assert c.finish_reason in ("stop", "length")
            if c.finish_reason == "stop":
                finished += 1
                _check(kind, c.text)
    assert finished >= 3  # most complete within 60 tokens (the grammars are short)


def test_grammar_completion_stops_even_with_ignore_eos(llm: LLM) -> None:
    params = SamplingParams(
        temperature=0.0, max_tokens=30, ignore_eos=True, structured_outputs={"choice": ["ok"]}
    )
    c = llm.generate("x", params, use_tqdm=False)[0].outputs[0]
    assert c.text == "ok" and c.finish_reason == "stop"


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_constrained_neighbours_change_nothing_for_the_others(
    llama_dir: Any, tiny_tokenizer: Any, async_scheduling: bool
) -> None:
    llm = LLM(str(llama_dir), async_scheduling=async_scheduling)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(len(tiny_tokenizer), 6, 3, 20, 2)]
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(prompts, free, use_tqdm=False)
    constrained = SamplingParams(
        temperature=0.7, seed=1, max_tokens=40, structured_outputs=CONSTRAINTS["json"]
    )
    mixed = llm.generate(prompts + prompts, [free] * 6 + [constrained] * 6, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:6]] == [o.outputs[0].token_ids for o in alone]
    for out in mixed[6:]:
        if out.outputs[0].finish_reason == "stop":
            _check("json", out.outputs[0].text)
    assert not llm.llm_engine.has_unfinished_requests()
    assert len(llm.llm_engine.structured_output) == 0  # every matcher dropped


@pytest.mark.parametrize(
    ("so", "match"),
    [
        ({"regex": "(unclosed"}, "unclosed group"),
        ({"json": {"type": "nonsense"}}, "nonsense"),
        ({"grammar": "start: nowhere"}, "nowhere"),
    ],
)
def test_bad_constraint_queues_nothing(llm: LLM, so: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        llm.generate("hi", SamplingParams(structured_outputs=so), use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()
    assert llm.generate("hi", SamplingParams(max_tokens=3), use_tqdm=False)[0].outputs[0].text


def test_demo_model_answers_in_the_schema() -> None:
    """The bundled demo model (a small trained model): JSON that validates, and a choice."""
    llm = LLM(device="cpu")
    schema_params = SamplingParams(
        temperature=0.0,
        max_tokens=80,
        structured_outputs={"json": SCHEMA, "disable_any_whitespace": True},
    )
    c = llm.generate("Report a bug in the parser:", schema_params, use_tqdm=False)[0].outputs[0]
    assert c.finish_reason == "stop"
    _check("json", c.text)
    pick = SamplingParams(temperature=0.0, structured_outputs={"choice": ["red", "green", "blue"]})
    assert llm.generate("My favourite colour is", pick, use_tqdm=False)[0].outputs[0].text in (
        "red",
        "green",
        "blue",
    )


def test_constrained_sequences_run_ahead_under_async_scheduling(llama_dir: Any) -> None:
    """A constrained step is sampled after the previous step's tokens advanced its grammar, so
    the sequence need not wait a step for its token: one step per token, as unconstrained."""
    llm = LLM(str(llama_dir), async_scheduling=True)
    runner = llm.llm_engine.runner
    inner = runner.execute_model
    steps: list[int] = []

    def execute_model(step: Any) -> Any:
        steps.append(len(step.scheduled))  # empty steps too: a waiting sequence costs one
        return inner(step)

    runner.execute_model = execute_model
    params = SamplingParams(
        temperature=0.0, max_tokens=30, structured_outputs={"regex": "[a-z ]{40}"}
    )
    c = llm.generate("count", params, use_tqdm=False)[0].outputs[0]
    assert re.fullmatch("[a-z ]*", c.text)
    n = len(c.token_ids)
    assert n >= 10
    # One prompt step, one per token, plus at most one sampled after the sequence finished
    # (a sequence waiting for its token on the host would need about two steps per token).
    assert len(steps) <= n + 2, (len(steps), n)


def _drain(engine: Any) -> dict[str, Any]:
    """Step until idle; the last output of each request."""
    last: dict[str, Any] = {}
    deadline = time.monotonic() + 60  # a loaded machine may take a while to compile
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "the engine did not finish"
        for out in engine.step():
            last[out.request_id] = out
        if not engine.has_queued_work():  # only grammars compiling: let their threads run
            time.sleep(0.002)
    return last


def test_grammar_compiles_aside_while_others_step(llm: LLM, tiny_tokenizer: Any) -> None:
    """With ``wait_for_grammar=False`` (the serving loop) a request whose grammar is compiling
    waits aside while the others' steps go on; once compiled it runs and gives what a request
    whose grammar was compiled at once gives. Failures come back from
    ``take_request_errors``; an aborted waiting request never runs and ends with an "abort"
    output, as any aborted request does."""
    import threading

    engine = llm.llm_engine
    so = engine.structured_output
    release = threading.Event()
    real = so.backend.compile

    def slow(params: StructuredOutputsParams) -> Any:
        if params.regex is not None and params.regex.startswith("slow"):
            assert release.wait(10)
        return real(params)

    prompt = random_prompts(len(tiny_tokenizer), 1, 5, 6, seed=3)[0]
    free = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    regex = "slow-[0-9]{3}"
    constrained = SamplingParams(
        temperature=0.0, max_tokens=20, structured_outputs={"regex": regex}
    )
    engine.structured_output.backend.compile = slow  # type: ignore[method-assign]
    try:
        engine.add_request("free", prompt, free)
        engine.add_request("waits", prompt, constrained, wait_for_grammar=False)
        engine.add_request("aborted", prompt, constrained, wait_for_grammar=False)
        engine.abort_request("aborted")
        got: dict[str, Any] = {}
        for _ in range(3):  # "waits" waits for its grammar; the others go on
            got.update((o.request_id, o) for o in engine.step())
            assert "waits" not in got
        release.set()
        got.update(_drain(engine))
        assert set(got) == {"free", "waits", "aborted"} and engine.take_request_errors() == []
        aborted = got.pop("aborted")  # ended at once, never run
        assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
        assert list(aborted.outputs[0].token_ids) == []
        assert len(got["free"].outputs[0].token_ids) == 8
        text = got["waits"].outputs[0].text
        assert re.fullmatch(regex, text), text
        engine.add_request("at-once", prompt, constrained)  # now cached: queued directly
        assert _drain(engine)["at-once"].outputs[0].token_ids == got["waits"].outputs[0].token_ids

        release.clear()
        so.compile_timeout_s = 0.2
        late = SamplingParams(structured_outputs={"regex": "slow-late"})
        engine.add_request("late", prompt, late, wait_for_grammar=False)
        bad = SamplingParams(structured_outputs={"regex": "a(b"})
        engine.add_request("bad", prompt, bad, wait_for_grammar=False)
        errors: dict[str, str] = {}
        for _ in range(400):
            engine.step()
            errors.update((rid, str(e)) for rid, e in engine.take_request_errors())
            if len(errors) == 2:
                break
            time.sleep(0.005)
        assert "took longer than 0.2 s" in errors["late"] and "unclosed" in errors["bad"]
        assert not engine.has_unfinished_requests()
    finally:
        release.set()
        so.compile_timeout_s = COMPILE_TIMEOUT_S
        engine.structured_output.backend.compile = real  # type: ignore[method-assign]
