"""Engine logprobs -> OpenAI's two shapes: chat (``{"content": [{token, logprob, bytes,
top_logprobs}]}``) and legacy completions (parallel ``tokens`` / ``token_logprobs`` /
``top_logprobs`` / ``text_offset`` lists)."""

from __future__ import annotations

from typing import Any

from pagedllm.entrypoints.openai.protocol_responses import (
    ChatLogprobEntry,
    ChatLogprobs,
    CompletionLogprobs,
    TopLogprob,
)
from pagedllm.outputs import Logprob


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet: printable bytes map to themselves, the rest to
    code points from 256 upwards, in byte order."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out: dict[str, int] = {}
    shifted = 0
    for b in range(256):
        if b in printable:
            out[chr(b)] = b
        else:
            out[chr(256 + shifted)] = b
            shifted += 1
    return out


class TokenBytes:
    """A token's exact UTF-8 bytes (byte-level BPE / byte-fallback pieces), else its text's."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self.decoder_map = _gpt2_byte_decoder()
        self.cache: dict[int, list[int]] = {}

    def __call__(self, token_id: int, text: str) -> list[int]:
        cached = self.cache.get(token_id)
        if cached is not None:
            return cached
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        result: list[int] | None = None
        if isinstance(piece, str):
            if self.byte_level and all(c in self.decoder_map for c in piece):
                result = [self.decoder_map[c] for c in piece]
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    result = [int(piece[3:5], 16)]
                except ValueError:
                    result = None
        if result is None:
            result = list(text.encode("utf-8"))
        if len(self.cache) < 1_000_000:
            self.cache[token_id] = result
        return result


def token_text(tokenizer: Any, token_id: int, entry: dict[int, Logprob] | None) -> str:
    lp = entry.get(token_id) if entry else None
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return str(tokenizer.decode([token_id]))


def top_entries(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The ``k`` best alternatives of one position, best first."""
    ranked = [(t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k]
    ranked.sort(key=lambda x: x[1].rank or 0)
    return ranked[:k]


def top_logprob_list(
    tokenizer: Any, tb: TokenBytes, entry: dict[int, Logprob], k: int
) -> list[TopLogprob]:
    out = []
    for tid, lp in top_entries(entry, k):
        text = token_text(tokenizer, tid, entry)
        out.append(TopLogprob(token=text, logprob=finite(lp.logprob), bytes=tb(tid, text)))
    return out


def finite(x: float) -> float:
    """Clamp ``-inf`` (not valid JSON) the way vLLM does."""
    return max(x, -9999.0)


def chat_logprobs(
    tokenizer: Any,
    tb: TokenBytes,
    token_ids: list[int],
    entries: list[dict[int, Logprob]] | None,
    k: int,
) -> ChatLogprobs:
    """Chat-completions logprobs of ``token_ids`` (``k`` alternatives each)."""
    content: list[ChatLogprobEntry] = []
    for tid, entry in zip(token_ids, entries or [], strict=False):
        text = token_text(tokenizer, tid, entry)
        lp = entry.get(tid)
        content.append(
            ChatLogprobEntry(
                token=text,
                logprob=finite(lp.logprob) if lp is not None else -9999.0,
                bytes=tb(tid, text),
                top_logprobs=top_logprob_list(tokenizer, tb, entry, k),
            )
        )
    return ChatLogprobs(content=content)


def append_legacy_logprobs(
    out: CompletionLogprobs,
    tokenizer: Any,
    token_ids: list[int],
    entries: list[dict[int, Logprob] | None],
    k: int,
    offset: int,
) -> int:
    """Append tokens to the legacy form; ``offset`` is the first token's character offset.
    Positions without an entry (the first prompt token) get ``None``. Returns the next offset."""
    for tid, entry in zip(token_ids, entries, strict=False):
        text = token_text(tokenizer, tid, entry)
        out.tokens.append(text)
        out.text_offset.append(offset)
        offset += len(text)
        lp = entry.get(tid) if entry else None
        if entry is None or lp is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(finite(lp.logprob))
        top = {text: finite(lp.logprob)}
        for alt, alt_lp in top_entries(entry, k):
            top.setdefault(token_text(tokenizer, alt, entry), finite(alt_lp.logprob))
        out.top_logprobs.append(top)
    return offset
