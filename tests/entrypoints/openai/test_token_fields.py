"""vLLM's ``allowed_token_ids`` and ``bad_words`` request fields on text and chat completions:
they reach the sampler (only allowed tokens come out; a banned word does not), and malformed
or out-of-vocabulary values are 400s naming the field, after which the server serves on."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.entrypoints.openai.conftest import MODEL_NAME, ServerProc
from tests.fixtures.tiny_models import VOCAB_SIZE

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def http(server: ServerProc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, headers=server.headers, timeout=60) as c:
        yield c


def complete(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 12, "ignore_eos": True}
    r = http.post(COMPLETIONS, json={**body, "logprobs": 0, **fields})
    assert r.status_code == 200, r.text
    return dict(r.json()["choices"][0])


def test_allowed_token_ids_on_completions(http: httpx.Client, tiny_tokenizer: Any) -> None:
    ids = sorted(set(tiny_tokenizer.encode(" the cat sat on the mat", add_special_tokens=False)))
    texts = {tiny_tokenizer.decode([i]) for i in ids}
    for seed in range(3):
        c = complete(http, allowed_token_ids=ids, temperature=1.0, seed=seed)
        tokens = c["logprobs"]["tokens"]
        assert len(tokens) == 12 and set(tokens) <= texts, tokens
        assert "".join(tokens) == c["text"]
    # One allowed token: the output is that token, every time.
    one = ids[0]
    c = complete(http, allowed_token_ids=[one], temperature=1.0, seed=0)
    assert c["text"] == tiny_tokenizer.decode([one]) * 12


def test_allowed_token_ids_on_chat(http: httpx.Client, tiny_tokenizer: Any) -> None:
    ids = tiny_tokenizer.encode(" yes no", add_special_tokens=False)
    allowed = {bytes(tiny_tokenizer.decode([i]).encode()) for i in ids}
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "yes or no?"}],
        "max_tokens": 8,
        "ignore_eos": True,
        "temperature": 1.0,
        "seed": 4,
        "logprobs": True,
        "allowed_token_ids": ids,
    }
    r = http.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    entries = r.json()["choices"][0]["logprobs"]["content"]
    assert len(entries) == 8 and {bytes(e["bytes"]) for e in entries} <= allowed


def test_bad_words(http: httpx.Client, tiny_tokenizer: Any) -> None:
    plain = complete(http, temperature=0.0)["logprobs"]["tokens"]

    def single(text: str) -> bool:
        return len(tiny_tokenizer.encode(text, add_special_tokens=False)) == 1

    # A word the greedy output writes that is one token with and without its leading space.
    pos, word = next(
        (i, t.strip())
        for i, t in enumerate(plain)
        if t.strip().isalpha() and single(t.strip()) and single(" " + t.strip())
    )
    banned = complete(http, temperature=0.0, bad_words=[word])["logprobs"]["tokens"]
    assert banned[:pos] == plain[:pos] and banned[pos] != plain[pos], (plain, banned)
    assert all(t.strip() != word for t in banned), banned


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"allowed_token_ids": [VOCAB_SIZE]}, "allowed_token_ids"),
        ({"allowed_token_ids": [3, 10**9]}, "allowed_token_ids"),
        ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": ["3"]}, "allowed_token_ids"),
        ({"bad_words": [""]}, "bad_words"),
        ({"bad_words": ["  "]}, "bad_words"),
        ({"bad_words": ["x" * 257]}, "bad_words"),
        ({"bad_words": ["w"] * 129}, "bad_words"),
        ({"bad_words": "word"}, "bad_words"),
    ],
)
@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_bad_values_are_400(
    http: httpx.Client, path: str, fields: dict[str, Any], param: str
) -> None:
    body: dict[str, Any] = {"model": MODEL_NAME, "max_tokens": 2, **fields}
    if path == CHAT:
        body["messages"] = [{"role": "user", "content": "hi"}]
    else:
        body["prompt"] = PROMPT
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok = http.post(COMPLETIONS, json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2})
    assert ok.status_code == 200, ok.text
