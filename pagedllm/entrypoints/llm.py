"""The offline API: ``LLM(model).generate(prompts, SamplingParams)`` and ``LLM.chat``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from pagedllm.config import EngineConfig
from pagedllm.engine.llm_engine import LLMEngine
from pagedllm.engine.tokenizer import apply_chat_template
from pagedllm.multimodal.chat import extract_images
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

PromptType = str | list[int] | dict[str, Any]
Conversation = list[dict[str, Any]]


class LLM:
    """An engine for offline batched generation.

    ``model`` is a Hugging Face model directory (the bundled demo model when omitted); every
    other keyword is an ``EngineConfig`` field (``dtype``, ``max_model_len``, ``block_size``,
    ``enable_prefix_caching``, ``load_format``, ...).
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (e.g. between benchmark arms); False while
        requests are in flight."""
        return self.llm_engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        return self.llm_engine.default_sampling_params()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate completions for all prompts; outputs come back in input order.

        ``prompts``: a string, a list of token ids, ``{"prompt": ...}`` /
        ``{"prompt_token_ids": ...}``, or a list of those. ``priority``: one per prompt (lower
        runs first); nonzero values need ``scheduling_policy="priority"``.
        """
        items = _as_prompt_list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(items)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(items):
                raise ValueError(
                    f"Got {len(params_list)} SamplingParams for {len(items)} prompts; pass one, "
                    "or one per prompt."
                )
        if priority is not None:
            if len(priority) != len(items):
                raise ValueError(f"Got {len(priority)} priorities for {len(items)} prompts.")
            for p in priority:  # before anything is queued (add_request checks it too)
                self.llm_engine.input_processor.check_priority(p)
        return self._run(items, params_list, use_tqdm, priority)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them (with
        ``tools``, OpenAI-style function definitions, for templates that describe them), then
        generate. Content parts ``{"type": "image_url", "image_url": {"url": ...}}`` or
        ``{"type": "image", "image": PIL.Image}`` give a multimodal model its images."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.get_tokenizer()
        prompts: list[PromptType] = []
        for conv in convs:
            conv, images = extract_images(conv)  # type: ignore[arg-type]
            ids = apply_chat_template(tok, conv, add_generation_prompt, chat_template, tools)
            prompt: dict[str, Any] = {"prompt_token_ids": ids}
            if images:
                prompt["multi_modal_data"] = {"image": images}
            prompts.append(prompt)
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(
        self,
        items: list[PromptType],
        params_list: list[SamplingParams],
        use_tqdm: bool,
        priority: Sequence[int] | None,
    ) -> list[RequestOutput]:
        engine = self.llm_engine
        ids: list[str] = []
        try:
            for i, (item, params) in enumerate(zip(items, params_list, strict=True)):
                prompt = item if not isinstance(item, dict) else _dict_prompt(item)
                params = dataclasses.replace(params, output_kind=RequestOutputKind.FINAL_ONLY)
                ids.append(
                    engine.add_request(
                        None, prompt, params, priority=priority[i] if priority else 0
                    )
                )
        except Exception:
            engine.abort_request(ids)  # nothing stays half-scheduled
            while engine.has_unfinished_requests():
                engine.step()
            raise
        order = {rid: i for i, rid in enumerate(ids)}
        results: list[RequestOutput | None] = [None] * len(ids)
        bar = tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm, unit="req")
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        bar.update(1)
        except BaseException:
            engine.abort_request(ids)
            raise
        finally:
            bar.close()
        return [r for r in results if r is not None]


def _dict_prompt(item: dict[str, Any]) -> str | list[int] | dict[str, Any]:
    if "multi_modal_data" in item:  # the input processor checks and processes it whole
        return item
    if "prompt_token_ids" in item:
        return list(item["prompt_token_ids"])
    if "prompt" in item:
        return str(item["prompt"])
    raise ValueError("A prompt dict needs a 'prompt' or 'prompt_token_ids' key.")


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    seq = list(prompts)
    if seq and all(isinstance(t, int) for t in seq):
        return [seq]  # type: ignore[list-item]
    return seq  # type: ignore[return-value]
