"""``LocalBackend``: programs on the in-process engine (``LLM``, ``AsyncLLM`` or a model path).

Prompts are tokenized exactly as the server tokenizes a ``/generate`` text (BOS added), so a
program gives the same text here and through ``Endpoint``. Roles use the model's own chat
template (``roles.py``). ``fork`` primes the prefix cache with the parent's text, so the
branches' prompts find its KV blocks and compute only their own tokens; ``select`` sends all
its choices in one submission, so they are scored in the same engine steps.
"""

from __future__ import annotations

from typing import Any

from pagedllm.lang.backend.base import Backend, GenOutput, OnDelta, ScoredPrompt
from pagedllm.lang.backend.drivers import AsyncDriver, EngineLoop, Submission
from pagedllm.lang.ir import GenParams
from pagedllm.lang.roles import RoleTemplate, derive_role_template, plain_role_template
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.structured_output.params import StructuredOutputsParams


def sampling_params(params: GenParams, stream: bool) -> SamplingParams:
    """The engine's ``SamplingParams`` of a resolved ``GenParams``."""
    constraint = None
    if params.regex is not None and params.json_schema is not None:
        raise ValueError("gen takes regex or json_schema, not both.")
    if params.regex is not None:
        constraint = StructuredOutputsParams(regex=params.regex)
    elif params.json_schema is not None:
        constraint = StructuredOutputsParams(json=params.json_schema)
    return SamplingParams(
        temperature=float(params.temperature or 0.0),
        top_p=float(params.top_p if params.top_p is not None else 1.0),
        top_k=int(params.top_k if params.top_k is not None else -1),
        min_p=float(params.min_p or 0.0),
        frequency_penalty=float(params.frequency_penalty or 0.0),
        presence_penalty=float(params.presence_penalty or 0.0),
        max_tokens=params.max_tokens,
        min_tokens=int(params.min_tokens or 0),
        ignore_eos=bool(params.ignore_eos),
        stop=params.stops(),
        stop_token_ids=params.stop_token_ids,
        structured_outputs=constraint,
        output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    )


def finish_reason(reason: str | None, stop_reason: Any, token_ids: list[int]) -> Any:
    """SGLang's ``finish_reason`` object (as ``/generate`` answers it)."""
    if reason == "stop":
        matched = stop_reason if stop_reason is not None else (token_ids or [None])[-1]
        return {"type": "stop", "matched": matched}
    if reason == "length":
        return {"type": "length", "length": len(token_ids)}
    return None if reason is None else {"type": reason}


class LocalBackend(Backend):
    """The local engine. ``model``: an ``LLM``, an ``AsyncLLM`` or a model path (then
    ``engine_kwargs`` build the ``LLM``); ``chat_template`` overrides the model's."""

    def __init__(
        self, model: Any = None, chat_template: str | None = None, **engine_kwargs: Any
    ) -> None:
        from pagedllm.engine.async_llm import AsyncLLM
        from pagedllm.entrypoints.llm import LLM

        if model is None or isinstance(model, str):
            model = LLM(model, **engine_kwargs)
        elif engine_kwargs:
            raise ValueError("engine_kwargs are only used when LocalBackend builds the LLM.")
        if isinstance(model, LLM):
            engine: Any = model.llm_engine
            self._driver: EngineLoop | AsyncDriver = EngineLoop(engine)
        elif isinstance(model, AsyncLLM):
            engine = model
            self._driver = AsyncDriver(model)
        else:
            raise TypeError(f"LocalBackend takes an LLM, an AsyncLLM or a path, not {model!r}.")
        self.tokenizer = engine.tokenizer
        self.processor = engine.input_processor
        self._roles = self._derive_roles(chat_template)

    def _derive_roles(self, chat_template: str | None) -> RoleTemplate:
        tok = self.tokenizer
        if chat_template is None and not getattr(tok, "chat_template", None):
            return plain_role_template()

        def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
            return str(
                tok.apply_chat_template(
                    messages,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                    chat_template=chat_template,
                )
            )

        empty = self.processor.tokenize("")
        auto = str(tok.decode(empty)) if empty else ""  # what tokenizing adds itself (BOS)
        return derive_role_template(render, auto)

    @property
    def role_template(self) -> RoleTemplate:
        return self._roles

    def _run(self, subs: list[Submission]) -> list[RequestOutput]:
        return [f.result() for f in self._driver.submit_many(subs)]

    def generate(self, text: str, params: GenParams, on_delta: OnDelta | None = None) -> GenOutput:
        ids = self.processor.tokenize(text)
        sp = sampling_params(params, stream=on_delta is not None)
        pieces: list[str] = []
        token_ids: list[int] = []

        def on_output(out: RequestOutput) -> None:
            c = out.outputs[0]
            pieces.append(c.text)
            token_ids.extend(c.token_ids)
            if on_delta is not None and c.text:
                on_delta(c.text)

        out = self._run([Submission(ids, sp, on_output if on_delta is not None else None)])[0]
        c = out.outputs[0]
        text_out = "".join(pieces) if on_delta is not None else c.text
        all_ids = token_ids if on_delta is not None else list(c.token_ids)
        meta = {
            "prompt_tokens": len(ids),
            "completion_tokens": len(all_ids),
            "cached_tokens": out.num_cached_tokens,
            "finish_reason": finish_reason(c.finish_reason, c.stop_reason, all_ids),
        }
        return GenOutput(text_out, meta)

    def score(self, prompts: list[str | list[int]], start: int = 0) -> list[ScoredPrompt]:
        ids = [self.processor.tokenize(p) for p in prompts]

        def params(n: int) -> SamplingParams:
            return SamplingParams(
                temperature=0.0,
                max_tokens=1,
                prompt_logprobs=0,
                prompt_logprobs_start=min(start, n - 1),
                output_kind=RequestOutputKind.FINAL_ONLY,
            )

        outs = self._run([Submission(i, params(len(i))) for i in ids])
        scored = []
        for i, out in zip(ids, outs, strict=True):
            positions = out.prompt_logprobs or [None] * len(i)
            lps = [
                (pos[t].logprob if pos is not None and t in pos else None)
                for t, pos in zip(i, positions, strict=True)
            ]
            scored.append(ScoredPrompt(i, lps))
        return scored

    def tokenize(self, text: str) -> list[int]:
        return self.processor.tokenize(text)

    def cache_prefix(self, text: str) -> None:
        sp = SamplingParams(temperature=0.0, max_tokens=1, output_kind=RequestOutputKind.FINAL_ONLY)
        self._run([Submission(self.processor.tokenize(text), sp)])

    def close(self) -> None:
        self._driver.close()
