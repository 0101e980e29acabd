"""What chat and text completions share: request checks (the token-level fields in
``token_fields.py``), sampling-parameter building (the structured-output constraint included,
``structured_outputs.py``), running generations
(several prompts merged into one stream, unfinished ones aborted however the stream ends), the
queue timeout, and answering with one JSON body or an SSE stream.

Templating and tokenization run in the server's thread pool (``off_loop``), never on the event
loop; see ``server_state.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from pagedllm.entrypoints.openai.accounting import PromptResult, RequestTracker, TokenCount
from pagedllm.entrypoints.openai.errors import APIError, bad_request
from pagedllm.entrypoints.openai.logprobs import TokenBytes
from pagedllm.entrypoints.openai.protocol import SamplingFields
from pagedllm.entrypoints.openai.server_state import ServerState
from pagedllm.entrypoints.openai.streaming import (
    ClientDisconnected,
    chain,
    map_engine_error,
    race_disconnect,
)
from pagedllm.entrypoints.openai.structured_outputs import (
    Constraint,
    engine_constraint_error,
    request_constraint,
)
from pagedllm.entrypoints.openai.token_fields import check_token_fields, logit_bias_ids
from pagedllm.outputs import RequestOutput
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

T = TypeVar("T")
logger = logging.getLogger(__name__)


class OpenAIServing:
    """Base of the chat and completion handlers."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.engine = state.engine
        self.tokenizer = state.engine.tokenizer
        self.processor = state.engine.input_processor  # the engine's request checks
        self.token_bytes = TokenBytes(self.tokenizer)
        self._background: set[asyncio.Task[None]] = set()

    def tracker(
        self, endpoint: str, completion_id: str, http_id: str, streamed: bool
    ) -> RequestTracker:
        st = self.state
        return RequestTracker(
            st.metrics, st.log_requests, endpoint, completion_id, http_id, streamed
        )

    def model_name(self, requested: str | None) -> str:
        names = self.state.served_model_names
        if requested is None or requested in names:
            return requested or names[0]
        raise APIError(
            404,
            f"The model {requested!r} does not exist. Served models: {', '.join(names)}.",
            param="model",
            code="model_not_found",
        )

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` (templating, tokenization) in the tokenizer thread pool."""
        return await asyncio.get_running_loop().run_in_executor(self.state.pool, fn, *args)

    def check_common(self, req: SamplingFields) -> Constraint | None:
        """Request-level checks shared by chat and completions (before any tokenization);
        returns the request's structured-output constraint, if any."""
        req.reject_unsupported()
        if req.n > self.state.max_n:
            raise bad_request(f"n must be at most {self.state.max_n}, got {req.n}.", "n")
        try:
            self.processor.check_priority(req.priority)
        except ValueError as e:
            raise bad_request(str(e), "priority") from None
        check_token_fields(req, self.processor)
        return request_constraint(req)

    def sampling_params(
        self,
        req: SamplingFields,
        *,
        max_tokens: int | None,
        logprobs: int | None,
        prompt_logprobs: int | None,
        stream: bool,
        constraint: Constraint | None = None,
    ) -> SamplingParams:
        defaults = self.engine.generation_defaults.sampling

        def pick(value: Any, key: str, fallback: Any) -> Any:
            return value if value is not None else defaults.get(key, fallback)

        kind = RequestOutputKind.FINAL_ONLY
        if stream or self.state.queue_timeout is not None or self.state.rate_limiter is not None:
            kind = RequestOutputKind.DELTA  # (token limits count tokens as they come)
        try:
            return SamplingParams(
                n=req.n,
                temperature=pick(req.temperature, "temperature", 1.0),
                top_p=pick(req.top_p, "top_p", 1.0),
                top_k=pick(req.top_k, "top_k", 0),
                min_p=pick(req.min_p, "min_p", 0.0),
                seed=req.seed,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=pick(req.repetition_penalty, "repetition_penalty", 1.0),
                max_tokens=max_tokens,
                min_tokens=req.min_tokens,
                ignore_eos=req.ignore_eos,
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                include_stop_str_in_output=req.include_stop_str_in_output,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                logit_bias=logit_bias_ids(req.logit_bias, self.processor.vocab_size),
                allowed_token_ids=req.allowed_token_ids,
                bad_words=req.bad_words or None,
                skip_special_tokens=req.skip_special_tokens,
                spaces_between_special_tokens=req.spaces_between_special_tokens,
                structured_outputs=constraint.params if constraint is not None else None,
                output_kind=kind,
            )
        except ValueError as e:
            raise bad_request(str(e).removeprefix("Invalid SamplingParams: ")) from e

    def check_fan_out(self, num_prompts: int, n: int) -> None:
        """400 when one request would start more sequences than ``--max-seqs-per-request``."""
        limit = self.state.max_seqs_per_request
        if num_prompts * n > limit:
            raise bad_request(
                f"This request asks for {num_prompts * n} sequences ({num_prompts} prompt(s) x "
                f"n={n}); at most {limit} are allowed per request (--max-seqs-per-request).",
                "n" if num_prompts == 1 else "prompt",
            )

    def track_usage(self, tracker: RequestTracker, subject: str | None, prompt_tokens: int) -> None:
        """Charge the request's tokens to its subject's rate limit when it ends."""
        limiter = self.state.rate_limiter
        if limiter is not None and subject is not None:
            tracker.on_finish = lambda output_tokens: limiter.charge(
                subject, prompt_tokens + output_tokens
            )

    def check_prompt(
        self, prompt_ids: list[int], params: SamplingParams, max_tokens: int | None, param: str
    ) -> None:
        """400 unless the request can run: first the context-length errors in OpenAI's wording
        (``min_tokens`` / ``max_tokens`` past ``max_model_len``; the engine caps ``max_tokens``
        instead), then the engine's own checks (``InputProcessor.check_prompt``)."""
        limit = self.state.max_model_len
        if params.min_tokens and len(prompt_ids) + params.min_tokens > limit:
            raise bad_request(
                f"min_tokens={params.min_tokens} cannot be reached: the {param} has "
                f"{len(prompt_ids)} tokens and this model's maximum context length is {limit}.",
                param="min_tokens",
                code="context_length_exceeded",
            )
        if max_tokens is not None and len(prompt_ids) + max_tokens > limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt_ids) + max_tokens} tokens ({len(prompt_ids)} in the {param}, "
                f"{max_tokens} in the completion). Please reduce the length of the {param} or "
                "completion.",
                param="max_tokens" if len(prompt_ids) < limit else param,
                code="context_length_exceeded",
            )
        try:
            self.processor.check_prompt(prompt_ids, params)
        except ValueError as e:
            code = "context_length_exceeded" if len(prompt_ids) >= limit else None
            raise bad_request(str(e), param=param, code=code) from e

    async def merged_generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        base_id: str,
        priority: int,
        constraint: Constraint | None = None,
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of one generation per prompt, interleaved as they come, tagged by index.

        However it ends (finished, error, cancelled by a disconnect, closed early), every
        generation that has not finished is aborted in the engine. The engine's refusal of
        ``constraint`` (it does not compile) is raised as a 400 naming the request's field.
        """
        ids = [base_id] if len(prompts) == 1 else [f"{base_id}-{i}" for i in range(len(prompts))]
        finished: set[int] = set()
        queue: asyncio.Queue[tuple[int, RequestOutput | None, BaseException | None]]
        queue = asyncio.Queue()

        timeout = self.state.request_timeout

        async def pump(i: int) -> None:
            try:
                gen = self.engine.generate(
                    prompts[i], params, ids[i], priority=priority, request_timeout_s=timeout
                )
                async for out in gen:
                    await queue.put((i, out, None))
                await queue.put((i, None, None))
            except Exception as e:  # reported to the consumer; cancellation is not
                await queue.put((i, None, e))

        tasks: list[asyncio.Task[None]] = []
        try:
            if len(prompts) == 1:
                async for out in self.engine.generate(
                    prompts[0], params, ids[0], priority=priority, request_timeout_s=timeout
                ):
                    if out.finished:
                        finished.add(0)
                    yield 0, out
                return
            tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
            remaining = len(tasks)
            while remaining:
                i, item, exc = await queue.get()
                if exc is not None:
                    raise exc
                if item is None:
                    remaining -= 1
                    continue
                if item.finished:
                    finished.add(i)
                yield i, item
        except ValueError as e:
            err = engine_constraint_error(e, constraint)
            if err is None:
                raise
            raise err from e
        finally:
            for t in tasks:
                t.cancel()
            for i, rid in enumerate(ids):
                if i not in finished:
                    self._abort_later(rid)

    def _abort_later(self, request_id: str) -> None:
        """Abort in a fresh task: the caller may be inside a cancelled scope."""

        async def abort() -> None:
            try:
                await self.engine.abort(request_id)
            except Exception:  # already gone, or the engine is dead: nothing to free
                logger.debug("abort(%s) failed", request_id, exc_info=True)

        try:
            task = asyncio.get_running_loop().create_task(abort())
        except RuntimeError:  # no running loop (generator finalised at shutdown)
            return
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def first_output(
        self, stream: AsyncIterator[tuple[int, RequestOutput]]
    ) -> tuple[int, RequestOutput] | None:
        """The first output, or a 503 if it does not come within ``--queue-timeout``."""
        timeout = self.state.queue_timeout
        try:
            return await asyncio.wait_for(anext(stream), timeout)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError as e:
            raise APIError(
                503,
                f"The request waited more than {timeout:g} s in the queue; retry later.",
                code="queue_timeout",
                headers={"Retry-After": "1"},
            ) from e
        except Exception as e:
            err = map_engine_error(e)
            if err is None:
                raise
            raise err from e

    async def collect(
        self, stream: AsyncIterator[tuple[int, RequestOutput]], tracker: RequestTracker, n: int
    ) -> dict[int, PromptResult]:
        """Run every generation to completion (non-streaming requests)."""
        results: dict[int, PromptResult] = {}
        item = await self.first_output(stream)
        while item is not None:
            i, out = item
            tracker.on_output(i, out, i * n)
            results.setdefault(i, PromptResult(list(out.prompt_token_ids))).add(out)
            try:
                item = await anext(stream, None)
            except Exception as e:
                err = map_engine_error(e)
                if err is None:
                    raise
                raise err from e
        return results

    async def respond(
        self,
        raw: Request,
        tracker: RequestTracker,
        stream: AsyncIterator[tuple[int, RequestOutput]],
        n: int,
        chunks: Callable[[AsyncIterator[tuple[int, RequestOutput]], TokenCount], AsyncIterator[str]]
        | None,
        final: Callable[[dict[int, PromptResult]], BaseModel],
    ) -> Response:
        """Answer with SSE (``chunks`` given) or one JSON body, racing client disconnects."""
        count = TokenCount()
        try:
            if chunks is not None:
                first = await race_disconnect(raw, self.first_output(stream))
                if first is None:
                    raise APIError(500, "The engine returned no output.")
                body = self._sse(tracker, chunks(chain(first, stream), count), count)
                return StreamingResponse(body, media_type="text/event-stream")
            results = await race_disconnect(raw, self.collect(stream, tracker, n))
        except ClientDisconnected:
            tracker.finish("client_disconnected", tracker.output_tokens)
            return Response(status_code=499)
        except APIError as e:
            tracker.finish("error", tracker.output_tokens, e.message)
            raise
        # Logprob entries and echo decoding can be large: build and encode off the loop.
        response = await self.off_loop(final, results)
        usage = getattr(response, "usage", None)
        tracker.finish("ok", usage.completion_tokens if usage is not None else 0)
        body = await self.off_loop(response.model_dump_json)
        return Response(body, media_type="application/json")

    async def _sse(
        self, tracker: RequestTracker, payloads: AsyncIterator[str], count: TokenCount
    ) -> AsyncIterator[str]:
        status, error = "client_disconnected", None
        try:
            async for payload in payloads:
                yield f"data: {payload}\n\n"
            status = "ok"
        except Exception as e:
            err = map_engine_error(e)
            if err is None:
                logger.exception("Streaming request %s failed", tracker.completion_id)
                err = APIError(500, f"Internal server error: {type(e).__name__}")
            status, error = "error", err.message
            yield f"data: {json.dumps(err.to_dict())}\n\n"
        finally:
            tracker.finish(status, max(count.value, tracker.output_tokens), error)
        yield "data: [DONE]\n\n"
