"""Where ``pagedllm chat`` (and ``infer``) send a conversation: the engine in this process, or an
OpenAI-compatible server.

Both backends take the same messages and sampling settings and yield the answer as text
deltas, so the REPL is written once. ``LocalBackend`` renders the conversation with the
model's chat template (``engine/tokenizer.apply_chat_template``, the renderer ``LLM.chat`` and
the server use) and streams the engine's ``DELTA`` outputs step by step; ``RemoteBackend``
streams ``/v1/chat/completions`` (SSE) from ``--base-url``, so the same REPL talks to a
pagedllm, vLLM or SGLang server. ``last_usage`` holds the token counts of the latest answer
(the REPL's tokens/s footer).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig

Message = dict[str, Any]


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Sampling:
    """The sampling settings the chat commands expose (None: the model's default)."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int = 512
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class ChatBackend(Protocol):
    name: str
    last_usage: Usage

    def stream(self, messages: list[Message], sampling: Sampling) -> Iterator[str]:
        """Yield the answer to ``messages`` as text pieces; closing the iterator early (an
        interrupt) aborts the request."""
        ...

    def close(self) -> None: ...


class LocalBackend:
    """The engine in this process (``LLMEngine``), streamed step by step."""

    def __init__(self, config: EngineConfig, chat_template: str | None = None) -> None:
        from pagedllm.engine.llm_engine import LLMEngine

        self.engine = LLMEngine(config)
        self.chat_template = chat_template
        self.name = config.model_config.model or "model"
        self.last_usage = Usage()

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        from pagedllm.engine.tokenizer import apply_chat_template

        return apply_chat_template(
            self.engine.tokenizer,
            messages,
            add_generation_prompt=True,
            chat_template=self.chat_template,
            no_template_hint="pass --chat-template",
        )

    def stream(self, messages: list[Message], sampling: Sampling) -> Iterator[str]:
        from pagedllm.sampling_params import RequestOutputKind

        engine = self.engine
        params = engine.default_sampling_params()
        if sampling.temperature is not None:
            params.temperature = sampling.temperature
        if sampling.top_p is not None:
            params.top_p = sampling.top_p
        params.max_tokens = sampling.max_tokens
        params.seed = sampling.seed
        params.output_kind = RequestOutputKind.DELTA
        ids = self.prompt_ids(messages)
        self.last_usage = usage = Usage(prompt_tokens=len(ids))
        rid = engine.add_request(None, ids, params)
        finished = False
        try:
            while not finished and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.request_id != rid:
                        continue
                    comp = out.outputs[0]
                    usage.completion_tokens += len(comp.token_ids)
                    finished = out.finished
                    if comp.text:
                        yield comp.text
        finally:
            if not finished:  # interrupted: free the request's blocks
                engine.abort_request(rid)
                while engine.has_unfinished_requests():
                    engine.step()

    def close(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if callable(shutdown):
            shutdown()


class RemoteBackend:
    """An OpenAI-compatible server's ``/v1/chat/completions``, streamed (SSE)."""

    def __init__(
        self, base_url: str, model: str | None, api_key: str | None, timeout: float = 600.0
    ) -> None:
        import httpx

        root = base_url.rstrip("/")
        self.base = root if root.endswith("/v1") else root + "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout)
        self.model = model or self._first_model()
        self.name = self.model
        self.last_usage = Usage()

    def _first_model(self) -> str:
        r = self.client.get(self.base + "/models")
        r.raise_for_status()
        data = r.json()["data"]
        if not data:
            raise ValueError(f"{self.base}/models lists no model")
        return str(data[0]["id"])

    def body(self, messages: list[Message], sampling: Sampling, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": sampling.max_tokens,
            "stream": stream,
            **sampling.extra,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        for key in ("temperature", "top_p", "seed"):
            value = getattr(sampling, key)
            if value is not None:
                body[key] = value
        return body

    def stream(self, messages: list[Message], sampling: Sampling) -> Iterator[str]:
        self.last_usage = usage = Usage()
        body = self.body(messages, sampling, stream=True)
        with self.client.stream("POST", self.base + "/chat/completions", json=body) as r:
            if r.status_code != 200:
                r.read()
                raise ValueError(f"the server answered {r.status_code}: {r.text}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    usage.completion_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text

    def close(self) -> None:
        self.client.close()
