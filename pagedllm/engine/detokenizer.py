"""Incremental detokenization and stop-string handling for one generated sequence.

Generated token ids arrive a few at a time; :class:`IncrementalDetokenizer` turns them into
text in O(new tokens) per step, never emits half of a multi-byte UTF-8 character, finds stop
strings across token boundaries, and holds back streamed text that may still turn out to be
the start of a stop string.

Fast (Rust-backed) tokenizers step a :class:`tokenizers.decoders.DecodeStream`; other
tokenizers use a prefix/read-offset window: decode a few already-emitted tokens with and
without the new ones and emit the difference. Both paths hold text back while it ends with
U+FFFD (an incomplete character); if too many tokens pile up (the model emits invalid
bytes), the window is split at a point proven to be a character boundary. The text starts
at the first generated token, exactly as ``tokenizer.decode(output_ids)`` renders it (the
prompt is not used as decoding context), so the final text equals that call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from pagedllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT_CHAR = "\ufffd"
# An incomplete UTF-8 character spans at most 3 byte tokens; with this many tokens held back,
# look for a character boundary to split at (the held text holds genuinely invalid bytes).
_SPLIT_HELD = 6
# With this many held back, emit everything as is (keeps every step bounded).
_FLUSH_HELD = 24
# Text on which transformers' clean_up_tokenization changes something.
_CLEANUP_PROBE = "a . b , c ! d ? e 's f n't g 'm h 've i 're"


def _applies_cleanup(tokenizer: PreTrainedTokenizerBase, backend: Tokenizer) -> bool:
    """Whether ``tokenizer.decode`` post-processes what the Rust decoder returns."""
    if not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return False
    ids = backend.encode(_CLEANUP_PROBE, add_special_tokens=False).ids
    return tokenizer.decode(ids) != backend.decode(ids, skip_special_tokens=False)


class _TokenStreamDecoder:
    """Turns a growing list of token ids into text deltas (see the module docstring)."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, skip_special: bool, spaces_between: bool
    ) -> None:
        backend = getattr(tokenizer, "_tokenizer", None)
        fast = getattr(tokenizer, "is_fast", False) and isinstance(backend, Tokenizer)
        self._backend: Tokenizer | None = (
            backend if fast and not _applies_cleanup(tokenizer, backend) else None
        )
        self._tokenizer, self._skip, self._spaces = tokenizer, skip_special, spaces_between
        self._stream = DecodeStream(skip_special_tokens=skip_special) if self._backend else None
        self._ids: list[int] = []
        # ids[prefix:read] were emitted last (decoding context); ids[read:] are held back.
        self._prefix = 0
        self._read = 0
        self._prefix_text: str | None = ""  # decode(ids[prefix:read]); None = not computed
        self._split_checked = 0  # split points below this were tested since the last emit

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self._skip)
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip, spaces_between_special_tokens=self._spaces
        )

    def _get_prefix_text(self) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        return self._prefix_text

    def step(self, new_ids: list[int]) -> str:
        """Append ``new_ids``; return the newly completed text (possibly empty)."""
        self._ids.extend(new_ids)
        return self._advance(new_ids)

    def _advance(self, new_ids: list[int]) -> str:
        """Try to emit the held tokens, of which ``new_ids`` are the newest."""
        if self._stream is not None:
            try:
                chunk = self._stream.step(self._backend, new_ids)
            except Exception:  # DecodeStream refuses a window whose text is not a prefix
                self._stream, chunk = None, None
            if chunk is not None:
                self._prefix, self._read, self._prefix_text = self._read, len(self._ids), None
                return chunk
        if self._stream is None:
            text = self._decode(self._ids[self._prefix :])
            if len(text) > len(self._get_prefix_text()) and not text.endswith(_REPLACEMENT_CHAR):
                return self._emit(text, len(self._ids))
        held = len(self._ids) - self._read
        if held >= _FLUSH_HELD:
            return self.flush()
        return self._split() if held >= _SPLIT_HELD else ""

    def flush(self) -> str:
        """Emit whatever is held back (the sequence ended)."""
        if self._read == len(self._ids):
            return ""
        return self._emit(self._decode(self._ids[self._prefix :]), len(self._ids))

    def pending_text(self) -> str:
        """What :meth:`flush` would emit now, without emitting it."""
        if self._read == len(self._ids):
            return ""
        return self._decode(self._ids[self._prefix :])[len(self._get_prefix_text()) :]

    def _split(self) -> str:
        """Emit held tokens up to the last point where the text splits cleanly.

        Whether a character straddles point k depends only on the bytes around k, so points
        tested on an earlier step are not tested again (keeps each step O(new tokens)).
        """
        ids, start = self._ids, self._prefix
        full = self._decode(ids[start:])
        emitted = len(self._get_prefix_text())
        lowest = max(self._read, self._split_checked - 1)
        self._split_checked = len(ids)
        for k in range(len(ids) - 1, lowest, -1):
            head = self._decode(ids[start:k])
            # Decoding the rest on its own changes nothing => no character straddles k.
            if len(head) > emitted and head + self._decode(ids[k:]) == full:
                return self._emit(head, k)
        return ""

    def _emit(self, text: str, end: int) -> str:
        """``text`` decodes ``ids[prefix:end]``: return its new part, make ``end`` the read point.

        Tokens after ``end`` stay held and are fed again. A DecodeStream is (re)started on the
        new window only when its text is clean (one primed on a text ending in U+FFFD would
        re-emit the window); until then the manual window path runs.
        """
        delta = text[len(self._get_prefix_text()) :]
        self._prefix, self._read = self._read, end
        self._split_checked = 0
        window = self._ids[self._prefix : end]
        self._prefix_text = self._decode(window)
        self._stream = None
        if self._backend is not None and not self._prefix_text.endswith(_REPLACEMENT_CHAR):
            self._stream = DecodeStream(ids=window, skip_special_tokens=self._skip)
        rest = self._ids[end:]
        return delta + self._advance(rest) if rest else delta


class IncrementalDetokenizer:
    """Detokenizes one sequence incrementally and checks it for stop strings.

    The text is kept as a list of pieces so that appending and stop-string search cost
    O(new text); only the whole-text accessors join (and cache) it.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        params: SamplingParams,
    ) -> None:
        # The prompt is deliberately not used as decoding context: the output must equal
        # ``tokenizer.decode(output_ids)`` (e.g. SentencePiece strips a first leading space).
        self.num_prompt_tokens = len(prompt_token_ids)
        skip, spaces = params.skip_special_tokens, params.spaces_between_special_tokens
        self._decoder = _TokenStreamDecoder(tokenizer, skip, spaces) if params.detokenize else None
        assert isinstance(params.stop, list)
        self._stops: list[str] = list(params.stop) if params.detokenize else []
        self._include_stop = params.include_stop_str_in_output
        self._lookback = max(max((len(s) for s in self._stops), default=0) - 1, 0)
        # With the stop string included, truncation never removes already-streamed text.
        self._holdback = 0 if self._include_stop else self._lookback
        self._parts: list[str] = []
        self._len = 0
        self._sent = 0  # characters already returned by get_next_output_text(delta=True)
        self.stop_reason: str | None = None

    def _append(self, piece: str) -> None:
        if piece:
            self._parts.append(piece)
            self._len += len(piece)

    def _suffix(self, n: int) -> str:
        """The last ``n`` characters of the text, in O(n)."""
        out: list[str] = []
        for part in reversed(self._parts):
            if n <= 0:
                break
            out.append(part[-n:] if len(part) > n else part)
            n -= len(part)
        return "".join(reversed(out))

    def _full(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def output_text(self) -> str:
        """Full text so far (after stop-string truncation), equal to ``tokenizer.decode``.

        Unlike :meth:`get_next_output_text` it includes bytes still held back (an incomplete
        character shows as U+FFFD), so a request finished by length has its exact text.
        """
        if self._decoder is None or self.stop_reason is not None:
            return self._full()
        return self._full() + self._decoder.pending_text()

    def update(self, new_token_ids: list[int], stop_terminated: bool) -> str | None:
        """Append generated ids; return the stop string that matched, else ``None``.

        With ``stop_terminated`` the last id ended the request (EOS / stop token) and is not
        rendered. After a stop string matched, further updates are ignored.
        """
        if self._decoder is None or self.stop_reason is not None:
            return None
        ids = new_token_ids[:-1] if stop_terminated else new_token_ids
        old_len = self._len
        if ids:
            self._append(self._decoder.step(list(ids)))
        if stop_terminated:
            self._append(self._decoder.flush())
        return self._check_stop(self._len - old_len) if self._stops else None

    def _check_stop(self, num_new: int) -> str | None:
        """Find the stop string that completes first in the last ``num_new`` characters."""
        region = self._suffix(min(self._len, num_new + self._lookback))
        best: tuple[int, int, str] | None = None  # (end, start, stop) within region
        for stop in self._stops:
            start = region.find(stop)
            if start != -1 and (best is None or (start + len(stop), start) < best[:2]):
                best = (start + len(stop), start, stop)
        if best is None:
            return None
        end, start, stop = best
        cut = self._len - len(region) + (end if self._include_stop else start)
        self._parts = [self._full()[:cut]]
        self._len = cut
        self.stop_reason = stop
        return stop

    def get_next_output_text(self, finished: bool, delta: bool) -> str:
        """Whole text (``delta=False``) or the part new since the last delta call.

        While not finished, the last ``len(longest stop) - 1`` characters are held back. When
        finished (for any reason), bytes still held back by the decoder are flushed first.
        """
        if finished and self._decoder is not None and self.stop_reason is None:
            self._append(self._decoder.flush())
        end = self._len if finished else max(self._len - self._holdback, 0)
        if not delta:
            return self._full()[:end]
        out = self._suffix(self._len - self._sent)[: end - self._sent] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return out
