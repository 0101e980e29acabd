"""The answer of SGLang's native ``/generate``: ``{"text", "meta_info"}`` per completion.

Logprob entries are ``[logprob, token_id, text | null]`` (the text only with
``return_text_in_logprobs``). ``input_token_logprobs`` cover prompt positions
``[logprob_start_len, len(prompt))``; the first prompt token has no logprob (``null``), as it
is conditioned on nothing. ``finish_reason`` is ``{"type": "stop", "matched": <string or token
id>}``, ``{"type": "length", "length": n}`` or ``{"type": "abort", "message"}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedllm.entrypoints.openai.accounting import ChoiceState, PromptResult
from pagedllm.outputs import Logprob

LogprobEntry = list[Any]  # [logprob | None, token_id, text | None]


@dataclass
class LogprobOptions:
    """What the request asked for, resolved against one prompt."""

    enabled: bool
    start: int  # first prompt position reported
    top_k: int
    with_text: bool


class NativeFormatter:
    """Builds ``meta_info`` dicts; ``decode`` turns one token id into its text."""

    def __init__(self, decode: Any, scoring_only: bool) -> None:
        self.decode = decode
        self.scoring_only = scoring_only  # max_new_tokens=0: the one sampled token is dropped

    def _entry(self, logprob: float | None, token_id: int, opts: LogprobOptions) -> LogprobEntry:
        return [logprob, token_id, self.decode(token_id) if opts.with_text else None]

    def _top(self, position: dict[int, Logprob] | None, opts: LogprobOptions) -> Any:
        if position is None:
            return None
        ranked = [(lp.rank, tid, lp.logprob) for tid, lp in position.items()]
        ranked = sorted((r, t, v) for r, t, v in ranked if r is not None and r <= opts.top_k)
        return [self._entry(v, t, opts) for _, t, v in ranked]

    def _token_entries(
        self, ids: list[int], positions: list[dict[int, Logprob] | None], opts: LogprobOptions
    ) -> tuple[list[LogprobEntry], list[Any]]:
        tokens: list[LogprobEntry] = []
        tops: list[Any] = []
        for tid, pos in zip(ids, positions, strict=True):
            lp = pos.get(tid) if pos is not None else None
            tokens.append(self._entry(lp.logprob if lp is not None else None, tid, opts))
            tops.append(self._top(pos, opts) if opts.top_k > 0 else None)
        return tokens, tops

    def completion_ids(self, st: ChoiceState) -> list[int]:
        return [] if self.scoring_only else st.token_ids

    def finish_reason(self, st: ChoiceState) -> dict[str, Any] | None:
        reason = st.finish_reason
        if reason is None:
            return None
        if self.scoring_only or reason == "length":
            return {"type": "length", "length": len(self.completion_ids(st))}
        if reason == "stop":
            matched = st.stop_reason
            if matched is None and st.token_ids:
                matched = st.token_ids[-1]  # an EOS token
            return {"type": "stop", "matched": matched}
        return {"type": "abort", "message": f"The request ended: {reason}."}

    def meta_info(
        self, rid: str, r: PromptResult, st: ChoiceState, opts: LogprobOptions
    ) -> dict[str, Any]:
        out_ids = self.completion_ids(st)
        meta: dict[str, Any] = {
            "id": rid,
            "prompt_tokens": len(r.prompt_token_ids),
            "completion_tokens": len(out_ids),
            "cached_tokens": r.num_cached_tokens,
            "finish_reason": self.finish_reason(st),
        }
        if not opts.enabled:
            return meta
        prompt = r.prompt_token_ids
        prompt_lps = list(r.prompt_logprobs or [None] * len(prompt))
        in_tok, in_top = self._token_entries(prompt[opts.start :], prompt_lps[opts.start :], opts)
        out_lps: list[dict[int, Logprob] | None] = list(st.logprobs or [])[: len(out_ids)]
        out_lps += [None] * (len(out_ids) - len(out_lps))
        out_tok, out_top = self._token_entries(out_ids, out_lps, opts)
        meta.update(
            input_token_logprobs=in_tok,
            output_token_logprobs=out_tok,
            input_top_logprobs=in_top,
            output_top_logprobs=out_top,
        )
        return meta

    def result(
        self, rid: str, r: PromptResult, st: ChoiceState, opts: LogprobOptions
    ) -> dict[str, Any]:
        text = "" if self.scoring_only else st.text
        return {"text": text, "meta_info": self.meta_info(rid, r, st, opts)}
