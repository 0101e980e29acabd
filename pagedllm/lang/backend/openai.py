"""``OpenAIBackend``: programs on any OpenAI-compatible server, for what its API can express.

The chat API answers messages, not text: ``gen`` runs only as the whole content of an
assistant block (``s += assistant(gen("a"))``), on the program's messages so far. ``select``
needs the logprobs of prompt tokens, which the chat API does not return, so it fails with an
error saying so; sampling options the API has no field for (``top_k``, ``min_p``, ``regex``, ...)
fail the same way rather than being dropped.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from pagedllm.lang.backend.base import Backend, GenOutput, OnDelta, ScoredPrompt
from pagedllm.lang.ir import GenParams
from pagedllm.lang.roles import RoleTemplate, plain_role_template


class OpenAIBackend(Backend):
    """``base_url`` ends with ``/v1``; ``model`` is the served model name."""

    can_score = False
    chat_only = True

    def __init__(
        self,
        model: str,
        base_url: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        timeout: float = 600.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self._client = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    @property
    def role_template(self) -> RoleTemplate:
        return plain_role_template()

    def _body(self, messages: list[dict[str, str]], params: GenParams) -> dict[str, Any]:
        for name, off in (
            ("top_k", -1),
            ("min_p", 0.0),
            ("min_tokens", 0),
            ("regex", None),
            ("stop_token_ids", None),
            ("ignore_eos", False),
        ):
            if getattr(params, name) not in (off, None):
                raise ValueError(f"gen({name}=...) cannot be expressed with the OpenAI API.")
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "frequency_penalty": params.frequency_penalty,
            "presence_penalty": params.presence_penalty,
        }
        if params.stops():
            body["stop"] = params.stops()
        if params.json_schema is not None:
            schema = {"name": "output", "schema": json.loads(params.json_schema)}
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        return body

    def generate_chat(
        self, messages: list[dict[str, str]], params: GenParams, on_delta: OnDelta | None
    ) -> GenOutput:
        body = self._body(messages, params)
        if on_delta is None:
            r = self._client.post("/chat/completions", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"chat/completions answered {r.status_code}: {r.text}")
            answer = r.json()
            choice = answer["choices"][0]
            usage = answer.get("usage") or {}
            meta = {
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "finish_reason": choice.get("finish_reason"),
            }
            return GenOutput(choice["message"]["content"] or "", meta)
        text = ""
        with self._client.stream("POST", "/chat/completions", json={**body, "stream": True}) as r:
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"chat/completions answered {r.status_code}: {r.text}")
            for line in r.iter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                for c in chunk.get("choices", []):
                    piece = (c.get("delta") or {}).get("content") or ""
                    if piece:
                        text += piece
                        on_delta(piece)
        return GenOutput(text, {})

    def generate(self, text: str, params: GenParams, on_delta: OnDelta | None = None) -> GenOutput:
        raise ValueError("OpenAIBackend is chat-only: gen must be an assistant block's content.")

    def score(self, prompts: list[str | list[int]], start: int = 0) -> list[ScoredPrompt]:
        raise ValueError("The OpenAI chat API does not return prompt logprobs.")

    def tokenize(self, text: str) -> list[int]:
        raise ValueError("The OpenAI chat API does not tokenize.")

    def cache_prefix(self, text: str) -> None:
        return None

    def close(self) -> None:
        self._client.close()
