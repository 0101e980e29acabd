"""End-to-end sampling behaviour: logprobs, seeds, stop strings, min/max tokens, penalties."""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from tests.fixtures.tiny_models import hf_greedy, hf_logprobs, load_hf_model, random_prompts


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:  # type: ignore[no-untyped-def]
    return LLM(str(llama_dir), block_size=8)


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return random_prompts(len(tiny_tokenizer), 6, 2, 30, seed=11)


def _close(a: float, b: float) -> bool:
    """Within 1e-4, scaled up for very unlikely tokens (|logprob| > 10) by fp32's relative
    precision: a logprob of -37 carries ~4e-6 per ulp."""
    return abs(a - b) <= 1e-4 * max(1.0, abs(b) / 10)


def _gen(llm: LLM, prompts: list[list[int]], params: SamplingParams):  # type: ignore[no-untyped-def]
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def test_logprobs_match_transformers(llm, llama_dir, prompts) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(
        temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5, prompt_logprobs=3
    )
    for out, prompt in zip(_gen(llm, prompts, params), prompts, strict=True):
        comp = out.outputs[0]
        ref = hf_logprobs(llama_dir, prompt + comp.token_ids)  # [L, V]
        # Sample logprobs: the chosen token plus the 5 best, equal to log_softmax.
        assert comp.logprobs is not None and len(comp.logprobs) == len(comp.token_ids)
        cum = 0.0
        for i, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
            row = ref[len(prompt) - 1 + i]
            assert entry[tok].rank == 1  # greedy picks the top token
            top = torch.topk(row, 5).indices.tolist()
            assert set(top) <= set(entry)
            for t, lp in entry.items():
                assert _close(lp.logprob, row[t].item())
            cum += entry[tok].logprob
        assert comp.cumulative_logprob == pytest.approx(cum, abs=1e-4)
        # Prompt logprobs: None for the first token, then the actual next token + top 3.
        plp = out.prompt_logprobs
        assert plp is not None and len(plp) == len(prompt) and plp[0] is None
        for pos in range(1, len(prompt)):
            entry = plp[pos]
            assert entry is not None and prompt[pos] in entry
            row = ref[pos - 1]
            assert _close(entry[prompt[pos]].logprob, row[prompt[pos]].item())
            assert entry[prompt[pos]].rank == int((row > row[prompt[pos]]).sum()) + 1
            assert set(torch.topk(row, 3).indices.tolist()) <= set(entry)


def test_prompt_logprobs_survive_chunking(llama_dir, prompts) -> None:  # type: ignore[no-untyped-def]
    chunked = LLM(str(llama_dir), max_num_batched_tokens=5)
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0)
    prompt = max(prompts, key=len)
    out = _gen(chunked, [prompt], params)[0]
    ref = hf_logprobs(llama_dir, prompt)
    assert out.prompt_logprobs is not None
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert entry is not None
        assert _close(entry[prompt[pos]].logprob, ref[pos - 1, prompt[pos]].item())


def test_prompt_logprobs_from_a_start_reuse_the_prefix_cache(llama_dir) -> None:  # type: ignore[no-untyped-def]
    """With ``prompt_logprobs_start`` the entries up to that position stay None, the others
    equal transformers', and the full blocks before it come from the prefix cache."""
    llm = LLM(str(llama_dir), block_size=8, enable_prefix_caching=True)
    prompt = random_prompts(512, 1, 41, 41, seed=17)[0]
    ref = hf_logprobs(llama_dir, prompt)
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1), use_tqdm=False)
    for start, cached in ((0, 0), (19, 16), (40, 40)):
        params = SamplingParams(max_tokens=1, prompt_logprobs=2, prompt_logprobs_start=start)
        out = _gen(llm, [prompt], params)[0]
        assert out.num_cached_tokens == cached
        plp = out.prompt_logprobs
        assert plp is not None and len(plp) == len(prompt)
        assert all(e is None for e in plp[: start + 1])
        for pos in range(start + 1, len(prompt)):
            entry = plp[pos]
            assert entry is not None
            assert _close(entry[prompt[pos]].logprob, ref[pos - 1, prompt[pos]].item())
    with pytest.raises(ValueError, match="below the prompt's length"):
        _gen(llm, [prompt], SamplingParams(prompt_logprobs=0, prompt_logprobs_start=41))
    with pytest.raises(ValueError, match="needs prompt_logprobs"):
        SamplingParams(prompt_logprobs_start=3)


def test_seeded_sampling_reproducible_and_batch_independent(llm, prompts) -> None:  # type: ignore[no-untyped-def]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    alone = _gen(llm, [prompts[0]], seeded)[0].outputs[0].token_ids
    again = _gen(llm, [prompts[0]], seeded)[0].outputs[0].token_ids
    assert alone == again
    noisy = SamplingParams(temperature=1.2, max_tokens=7, ignore_eos=True)
    mixed = llm.generate(
        [{"prompt_token_ids": p} for p in [prompts[2], prompts[0], prompts[3]]],
        [noisy, seeded, noisy],
        use_tqdm=False,
    )
    assert mixed[1].outputs[0].token_ids == alone
    other = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=10, ignore_eos=True)
    assert _gen(llm, [prompts[0]], other)[0].outputs[0].token_ids != alone


def test_n_seeded_completions_differ(llm, prompts) -> None:  # type: ignore[no-untyped-def]
    params = SamplingParams(n=3, temperature=1.5, seed=5, max_tokens=12, ignore_eos=True)
    out = _gen(llm, [prompts[1]], params)[0]
    texts = {tuple(c.token_ids) for c in out.outputs}
    assert len(out.outputs) == 3 and len(texts) > 1
    assert _gen(llm, [prompts[1]], params)[0].outputs[0].token_ids == out.outputs[0].token_ids


def test_stop_string_across_tokens(llm, llama_dir, prompts, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    full = _gen(llm, [prompts[0]], greedy)[0].outputs[0]
    text = full.text
    assert len(text) > 8
    stop = text[3:8]  # spans token boundaries in general
    out = _gen(
        llm,
        [prompts[0]],
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, stop=[stop]),
    )[0].outputs[0]
    cut = text.index(stop)
    assert out.text == text[:cut]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    incl = _gen(
        llm,
        [prompts[0]],
        SamplingParams(
            temperature=0.0,
            max_tokens=16,
            ignore_eos=True,
            stop=[stop],
            include_stop_str_in_output=True,
        ),
    )
    assert incl[0].outputs[0].text == text[: cut + len(stop)]


def test_stop_token_min_and_max_tokens(llm, prompts) -> None:  # type: ignore[no-untyped-def]
    base = _gen(llm, [prompts[2]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[
        0
    ].outputs[0]
    assert len(base.token_ids) == 8 and base.finish_reason == "length"
    stop_tok = base.token_ids[2]
    out = _gen(
        llm,
        [prompts[2]],
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, stop_token_ids=[stop_tok]),
    )[0].outputs[0]
    first = base.token_ids.index(stop_tok)
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    held = _gen(
        llm,
        [prompts[2]],
        SamplingParams(
            temperature=0.0, max_tokens=8, ignore_eos=True, stop_token_ids=[stop_tok], min_tokens=6
        ),
    )[0].outputs[0]
    assert len(held.token_ids) >= 6 and stop_tok not in held.token_ids[:6]


def _reference_penalised_greedy(model_dir, prompt, steps, rep, pres, freq) -> list[int]:  # type: ignore[no-untyped-def]
    """Direct per-step reference: transformers logits + penalties written out by hand."""
    model = load_hf_model(model_dir)
    ids = list(prompt)
    out: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float().clone()
        for tok in set(ids):
            logits[tok] = logits[tok] / rep if logits[tok] > 0 else logits[tok] * rep
        for tok in set(out):
            logits[tok] -= freq * out.count(tok) + pres
        nxt = int(logits.argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


def test_penalties_match_direct_reference(llm, llama_dir, prompts) -> None:  # type: ignore[no-untyped-def]
    rep, pres, freq = 1.3, 0.5, 0.3
    params = SamplingParams(
        temperature=0.0,
        max_tokens=10,
        ignore_eos=True,
        repetition_penalty=rep,
        presence_penalty=pres,
        frequency_penalty=freq,
    )
    outs = _gen(llm, prompts[:3], params)
    for out, prompt in zip(outs, prompts[:3], strict=True):
        ref = _reference_penalised_greedy(llama_dir, prompt, 10, rep, pres, freq)
        assert out.outputs[0].token_ids == ref
    plain = hf_greedy(llama_dir, prompts[:3], 10)
    assert [o.outputs[0].token_ids for o in outs] != plain  # the penalties did something


def test_text_equals_tokenizer_decode(llm, prompts, tiny_tokenizer) -> None:  # type: ignore[no-untyped-def]
    outs = _gen(
        llm, prompts, SamplingParams(temperature=0.7, seed=2, max_tokens=20, ignore_eos=True)
    )
    for out in outs:
        comp = out.outputs[0]
        assert comp.text == tiny_tokenizer.decode(comp.token_ids, skip_special_tokens=True)


def test_timing_and_cached_fields(llm, prompts) -> None:  # type: ignore[no-untyped-def]
    out = _gen(llm, prompts[:1], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    ttft, total = out.metrics.time_to_first_token, out.metrics.total_time
    assert ttft is not None and total is not None and 0 <= ttft <= total
    assert out.num_cached_tokens >= 0
