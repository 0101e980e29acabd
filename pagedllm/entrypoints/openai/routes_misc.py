"""Small read-only routes clients probe for: ``GET /v1/models/{model}`` and ``/tokenizer_info``.

OpenAI's SDKs call ``models.retrieve(id)`` (``GET /v1/models/{id}``; ids such as
``Qwen/Qwen2.5-0.5B-Instruct`` contain a slash, so the route takes a path); an unknown id is the
same 404 ``model_not_found`` error object as on the generation routes. ``/tokenizer_info``
describes the tokenizer (class, special tokens, vocabulary size, the chat template) so that a
client can tokenize like the server; as in vLLM it exists only with
``--enable-tokenizer-info-endpoint``, since the chat template can be a deployment's secret.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from pagedllm.entrypoints.openai.errors import APIError
from pagedllm.entrypoints.openai.openapi import get_responses, post_responses
from pagedllm.entrypoints.openai.protocol_responses import ModelCard

if TYPE_CHECKING:
    from pagedllm.engine.async_llm import AsyncLLM


def install_misc_routes(
    app: FastAPI,
    engine: AsyncLLM,
    names: list[str],
    model_card: Callable[[str], ModelCard],
    *,
    tokenizer_info: bool,
    chat_template: str | None,
) -> None:
    """Add ``GET /v1/models/{model}`` and (when ``tokenizer_info``) ``GET /tokenizer_info``."""

    with_404 = {**get_responses(), 404: post_responses()[404]}

    @app.get("/v1/models/{model:path}", responses=with_404)
    async def retrieve_model(model: str) -> ModelCard:
        if model not in names:
            raise APIError(
                404,
                f"The model {model!r} does not exist. Served models: {', '.join(names)}.",
                param="model",
                code="model_not_found",
            )
        return model_card(model)

    if not tokenizer_info:
        return

    @app.get("/tokenizer_info", responses=get_responses())
    async def get_tokenizer_info() -> dict[str, Any]:
        tok = engine.tokenizer
        return {
            "tokenizer_class": type(tok).__name__,
            "vocab_size": len(tok),
            "model_max_length": engine.input_processor.max_model_len,
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "add_bos_token": getattr(tok, "add_bos_token", None),
            "added_special_tokens": sorted(str(t) for t in tok.all_special_tokens),
            "chat_template": chat_template or getattr(tok, "chat_template", None),
        }
