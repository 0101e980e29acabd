"""``POST /generate`` in SGLang's native shape, on the machinery of the OpenAI routes.

It shares ``OpenAIServing``'s checks and plumbing (the engine's prompt checks, fan-out limit,
queue timeout, rate-limit charging, disconnect racing, aborting unfinished generations) and
differs only in the request and answer shapes (``native_protocol.py``, ``native_format.py``).

``max_new_tokens=0`` ("prefill only": prime the prefix cache, or score a prompt with
``return_logprob``) runs as a one-token generation whose token is dropped from the answer, so
the engine needs no special case. Several prompts (or ``n > 1``) answer a list, prompt-major,
in request order; streaming sends each completion's cumulative ``text`` with its ``meta_info``
(and its ``index`` in that order), then ``data: [DONE]``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from pagedllm.entrypoints.openai.accounting import PromptResult, RequestTracker, TokenCount
from pagedllm.entrypoints.openai.errors import APIError, bad_request
from pagedllm.entrypoints.openai.native_format import LogprobOptions, NativeFormatter
from pagedllm.entrypoints.openai.native_protocol import (
    SGLANG_DEFAULT_MAX_NEW_TOKENS,
    GenerateRequest,
    NativeSamplingParams,
    unsupported_fields,
)
from pagedllm.entrypoints.openai.server_state import (
    MAX_PROMPTS,
    check_unicode,
    random_id,
    rate_subject,
)
from pagedllm.entrypoints.openai.serving_base import OpenAIServing
from pagedllm.entrypoints.openai.streaming import ClientDisconnected, chain, race_disconnect
from pagedllm.entrypoints.openai.structured_outputs import Constraint
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.structured_output.params import StructuredOutputsParams


def _constraint(sp: NativeSamplingParams) -> Constraint | None:
    """The structured-output constraint of ``regex`` / ``json_schema`` / ``ebnf`` (one)."""
    given = {
        name: value
        for name, value in (("regex", sp.regex), ("json_schema", sp.json_schema), ("ebnf", sp.ebnf))
        if value is not None
    }
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(
            f"Pass at most one of regex, json_schema and ebnf (got {', '.join(given)}).",
            "sampling_params",
        )
    ((name, value),) = given.items()
    key = {"regex": "regex", "json_schema": "json", "ebnf": "grammar"}[name]
    try:
        return Constraint(StructuredOutputsParams(**{key: value}), f"sampling_params.{name}")
    except ValueError as e:
        raise bad_request(str(e), f"sampling_params.{name}") from e


class NativeServing(OpenAIServing):
    """Handles SGLang's ``/generate``."""

    def _prompts(self, req: GenerateRequest) -> tuple[list[str | list[int]], bool]:
        """The prompts, and whether the request named a single one (answered unwrapped)."""
        if (req.text is None) == (req.input_ids is None):
            raise bad_request("Pass exactly one of text or input_ids.", "text")
        raw: list[str | list[int]]
        if isinstance(req.text, str):
            raw, single = [req.text], True
        elif req.text is not None:
            raw, single = list(req.text), False
        else:
            ids = req.input_ids or []
            single = bool(ids) and all(isinstance(t, int) for t in ids)
            raw = [list(ids)] if single else [list(p) for p in ids]  # type: ignore[arg-type]
        if not raw:
            raise bad_request("The prompt list is empty.", "text" if req.text else "input_ids")
        if len(raw) > MAX_PROMPTS:
            raise bad_request(f"At most {MAX_PROMPTS} prompts per request.", "text")
        for p in raw:
            if isinstance(p, str):
                self.state.check_text_fits(len(p), "text")
            elif not self.processor.in_vocab(p):
                vocab = self.processor.vocab_size
                raise bad_request(f"Token ids must be in [0, {vocab}).", "input_ids")
        return raw, single

    def _tokenize(self, raw: list[str | list[int]]) -> list[list[int]]:
        out: list[list[int]] = []
        for p in raw:
            if isinstance(p, str):
                check_unicode(p, "text")
            out.append(self.processor.tokenize(p))
        return out

    def _params(
        self, req: GenerateRequest, constraint: Constraint | None
    ) -> tuple[SamplingParams, int]:
        sp = req.sampling_params or NativeSamplingParams()
        if sp.n > self.state.max_n:
            raise bad_request(f"n must be at most {self.state.max_n}, got {sp.n}.", "n")
        limit = self.state.logprobs_limit
        if req.top_logprobs_num > limit:
            raise bad_request(f"top_logprobs_num must be at most {limit}.")
        max_new = SGLANG_DEFAULT_MAX_NEW_TOKENS if sp.max_new_tokens is None else sp.max_new_tokens
        if max_new == 0 and (sp.n > 1 or constraint is not None):
            raise bad_request(
                "max_new_tokens=0 (prefill only) takes neither n > 1 nor a "
                "regex / json_schema / ebnf.",
                "sampling_params.max_new_tokens",
            )
        if sp.min_new_tokens > max(max_new, 1) or (max_new == 0 and sp.min_new_tokens):
            raise bad_request(
                f"min_new_tokens ({sp.min_new_tokens}) must be <= max_new_tokens ({max_new}).",
                "sampling_params.min_new_tokens",
            )
        lp = req.top_logprobs_num if req.return_logprob else None
        kind = RequestOutputKind.FINAL_ONLY
        st = self.state
        if req.stream or st.queue_timeout is not None or st.rate_limiter is not None:
            kind = RequestOutputKind.DELTA  # the queue timeout waits for the first token only
        try:
            params = SamplingParams(
                n=sp.n,
                temperature=sp.temperature,
                top_p=sp.top_p,
                top_k=sp.top_k,
                min_p=sp.min_p,
                seed=sp.sampling_seed,
                presence_penalty=sp.presence_penalty,
                frequency_penalty=sp.frequency_penalty,
                repetition_penalty=sp.repetition_penalty,
                max_tokens=max(max_new, 1),
                min_tokens=sp.min_new_tokens,
                ignore_eos=sp.ignore_eos,
                stop=sp.stop,
                stop_token_ids=sp.stop_token_ids,
                include_stop_str_in_output=sp.no_stop_trim,
                logprobs=lp,
                prompt_logprobs=lp,
                skip_special_tokens=sp.skip_special_tokens,
                spaces_between_special_tokens=sp.spaces_between_special_tokens,
                structured_outputs=constraint.params if constraint is not None else None,
                output_kind=kind,
            )
        except ValueError as e:
            message = str(e).removeprefix("Invalid SamplingParams: ")
            raise bad_request(message, "sampling_params") from e
        return params, max_new

    def _logprob_options(self, req: GenerateRequest, prompt_len: int) -> LogprobOptions:
        start = prompt_len - 1 if req.logprob_start_len == -1 else req.logprob_start_len
        if req.return_logprob and start >= prompt_len:
            raise bad_request(
                f"logprob_start_len ({start}) must be below the prompt's length ({prompt_len}).",
                "logprob_start_len",
            )
        return LogprobOptions(
            req.return_logprob, start, req.top_logprobs_num, req.return_text_in_logprobs
        )

    async def create(self, req: GenerateRequest, raw: Request, http_id: str) -> Response:
        names = unsupported_fields(req)
        if names:
            raise bad_request(
                f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} not supported by "
                "this server's /generate.",
                names[0],
            )
        constraint = _constraint(req.sampling_params or NativeSamplingParams())
        raw_prompts, single = self._prompts(req)
        params, max_new = self._params(req, constraint)
        self.check_fan_out(len(raw_prompts), params.n)
        prompts = await self.off_loop(self._tokenize, raw_prompts)
        opts = [self._logprob_options(req, len(p)) for p in prompts]
        if params.prompt_logprobs is not None:
            # Nothing before logprob_start_len is reported: those positions need no logits, so
            # the prefix cache may supply them (position p's logits score prompt token p + 1).
            first = min(max(o.start - 1, 0) for o in opts)
            params = dataclasses.replace(params, prompt_logprobs_start=first)
        for ids in prompts:
            self.check_prompt(ids, params, max(max_new, 1), "text")
        rid = random_id("gen")
        tracker = self.tracker("generate", rid, http_id, req.stream)
        self.track_usage(tracker, rate_subject(raw), sum(len(p) for p in prompts))
        fmt = NativeFormatter(self._decode_token, scoring_only=max_new == 0)
        ctx = _Request(fmt, rid, params.n, opts, single and params.n == 1)
        stream = self.merged_generate(prompts, params, rid, 0, constraint)
        try:
            if req.stream:
                first = await race_disconnect(raw, self.first_output(stream))
                if first is None:
                    raise APIError(500, "The engine returned no output.")
                count = TokenCount()
                body = self._sse(tracker, ctx.chunks(chain(first, stream), tracker, count), count)
                return StreamingResponse(body, media_type="text/event-stream")
            results = await race_disconnect(raw, self.collect(stream, tracker, params.n))
        except ClientDisconnected:
            tracker.finish("client_disconnected", tracker.output_tokens)
            return Response(status_code=499)
        except APIError as e:
            tracker.finish("error", tracker.output_tokens, e.message)
            raise
        answer = await self.off_loop(ctx.final, results)
        tracker.finish("ok", ctx.completion_tokens)
        return Response(json.dumps(answer), media_type="application/json")

    def _decode_token(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))


class _Request:
    """Per-request answer state: ids, logprob options per prompt, streaming accumulators."""

    def __init__(
        self, fmt: NativeFormatter, rid: str, n: int, opts: list[LogprobOptions], single: bool
    ) -> None:
        self.fmt = fmt
        self.rid = rid
        self.n = n
        self.opts = opts
        self.single = single
        self.completion_tokens = 0

    def _rid(self, index: int) -> str:
        return self.rid if self.single else f"{self.rid}-{index}"

    def final(self, results: dict[int, PromptResult]) -> dict[str, Any] | list[dict[str, Any]]:
        answers: list[dict[str, Any]] = []
        for i in sorted(results):
            r = results[i]
            for j in sorted(r.choices):
                st = r.choices[j]
                self.completion_tokens += len(self.fmt.completion_ids(st))
                answers.append(self.fmt.result(self._rid(i * self.n + j), r, st, self.opts[i]))
        return answers[0] if self.single else answers

    async def chunks(
        self,
        items: AsyncIterator[tuple[int, RequestOutput]],
        tracker: RequestTracker,
        count: TokenCount,
    ) -> AsyncIterator[str]:
        results: dict[int, PromptResult] = {}
        async for i, out in items:
            tracker.on_output(i, out, i * self.n)
            r = results.setdefault(i, PromptResult(list(out.prompt_token_ids)))
            r.add(out)
            for c in out.outputs:
                st = r.choices[c.index]
                if not c.token_ids and c.finish_reason is None:
                    continue
                count.value += 0 if self.fmt.scoring_only else len(c.token_ids)
                index = i * self.n + c.index
                answer = self.fmt.result(self._rid(index), r, st, self.opts[i])
                if not self.single:
                    answer["index"] = index
                yield json.dumps(answer)
