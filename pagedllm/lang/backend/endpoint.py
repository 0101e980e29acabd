"""``Endpoint``: programs on a ``pagedllm serve`` over HTTP, through SGLang's native routes.

``gen`` is one ``POST /generate`` of the state's text (streamed when the program is); ``select``
scores every ``text + choice`` in one ``/generate`` with ``max_new_tokens=0`` and prompt
logprobs (and tokenizes the text alone with ``/tokenize``); ``fork`` primes the server's
prefix cache with a ``max_new_tokens=0`` call. The roles are the server model's own chat
template, rendered by the server (``/tokenize`` with messages, then
``/detokenize``), so a program gives the same text here as on ``LocalBackend``.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from pagedllm.lang.backend.base import Backend, GenOutput, OnDelta, ScoredPrompt
from pagedllm.lang.ir import GenParams
from pagedllm.lang.roles import RoleTemplate, derive_role_template, plain_role_template


def native_sampling_params(params: GenParams) -> dict[str, Any]:
    """``/generate``'s ``sampling_params`` of a resolved ``GenParams``."""
    sp: dict[str, Any] = {
        "max_new_tokens": params.max_tokens,
        "min_new_tokens": params.min_tokens or 0,
        "stop": params.stops(),
        "stop_token_ids": params.stop_token_ids or [],
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "min_p": params.min_p,
        "frequency_penalty": params.frequency_penalty,
        "presence_penalty": params.presence_penalty,
        "ignore_eos": params.ignore_eos,
    }
    if params.regex is not None:
        sp["regex"] = params.regex
    if params.json_schema is not None:
        sp["json_schema"] = params.json_schema
    return {k: v for k, v in sp.items() if v is not None}


# What the server's /tokenize answers for messages when the model has no chat template
# (``pagedllm.engine.tokenizer.apply_chat_template``).
NO_TEMPLATE = "has no chat template"


class Endpoint(Backend):
    """A pagedllm server at ``base_url`` (e.g. ``http://127.0.0.1:8000``)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        role_template: RoleTemplate | None = None,
        timeout: float = 600.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.model_info = self._call("GET", "/get_model_info")
        self._roles = role_template or self._derive_roles()

    def _derive_roles(self) -> RoleTemplate:
        """The server's chat template split into role markers; ``ROLE: text`` lines when the
        model has none, as ``LocalBackend`` does for the same model."""
        try:
            self._render([{"role": "user", "content": "a"}], False)
        except RuntimeError as e:
            if NO_TEMPLATE not in str(e):
                raise
            return plain_role_template()
        return derive_role_template(self._render, self._auto_prefix())

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        r = self._client.request(method, path, json=body)
        if r.status_code != 200:
            try:
                message = r.json()["error"]["message"]
            except Exception:
                message = r.text
            raise RuntimeError(f"{method} {path} answered {r.status_code}: {message}")
        return r.json()

    def _detokenize(self, ids: list[int]) -> str:
        return str(self._call("POST", "/detokenize", {"tokens": ids})["prompt"]) if ids else ""

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        body = {"messages": messages, "add_generation_prompt": add_generation_prompt}
        return self._detokenize(self._call("POST", "/tokenize", body)["tokens"])

    def _auto_prefix(self) -> str:
        return self._detokenize(self.empty_prompt_ids())

    @property
    def role_template(self) -> RoleTemplate:
        return self._roles

    def generate(self, text: str, params: GenParams, on_delta: OnDelta | None = None) -> GenOutput:
        body = {"text": text, "sampling_params": native_sampling_params(params)}
        if on_delta is None:
            answer = self._call("POST", "/generate", body)
            return GenOutput(answer["text"], answer["meta_info"])
        seen, meta = "", {}
        with self._client.stream("POST", "/generate", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"POST /generate answered {r.status_code}: {r.text}")
            for line in r.iter_lines():
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RuntimeError(f"POST /generate failed: {chunk['error']['message']}")
                piece, seen, meta = chunk["text"][len(seen) :], chunk["text"], chunk["meta_info"]
                if piece:
                    on_delta(piece)
        return GenOutput(seen, meta)

    def score(self, prompts: list[str | list[int]], start: int = 0) -> list[ScoredPrompt]:
        texts = all(isinstance(p, str) for p in prompts)
        if not texts and not all(isinstance(p, list) for p in prompts):
            return [self.score([p], start)[0] for p in prompts]
        body: dict[str, Any] = {
            "text" if texts else "input_ids": list(prompts),
            "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True,
            "logprob_start_len": 0,
        }
        first = 0
        if start > 0:  # token ids first, to report only from start + 1 (the rest may be cached)
            ids = [self.tokenize(p) if isinstance(p, str) else list(p) for p in prompts]
            first = min(min(start + 1, len(i) - 1) for i in ids)
            body = {**body, "input_ids": ids, "logprob_start_len": first}
            body.pop("text", None)
        answers = self._call("POST", "/generate", body)
        scored = []
        for a in answers:
            entries = a["meta_info"]["input_token_logprobs"]
            token_ids = body["input_ids"][len(scored)] if first else [e[1] for e in entries]
            lps = [None] * first + [e[0] for e in entries]
            assert len(lps) == len(token_ids), "the server tokenized differently"
            scored.append(ScoredPrompt(token_ids, lps))
        return scored

    def tokenize(self, text: str) -> list[int]:
        return list(self._call("POST", "/tokenize", {"prompt": text})["tokens"])

    def cache_prefix(self, text: str) -> None:
        self._call("POST", "/generate", {"text": text, "sampling_params": {"max_new_tokens": 0}})

    def close(self) -> None:
        self._client.close()
