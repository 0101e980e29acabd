"""Tests for incremental detokenization and stop strings (``pagedllm.engine.detokenizer``)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pagedllm.engine import detokenizer as detok_mod
from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.sampling_params import SamplingParams

EOS_ID = 1  # tests/fixtures/tiny_models.py: <|bos|>=0, <|eos|>=1, <|user|>=2, ..., <|end|>=5
USER_ID = 2
END_ID = 5
REPL = "\ufffd"
TEXT = "Hello 你好, 世界! Ça va? Größe 😀🚀 Привет, как дела? done."


class _PythonOnly:
    """Hides the Rust backend so the prefix/read-offset fallback path is exercised."""

    is_fast = False

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return self._tok.decode(ids, **kwargs)


def _byte_ids(tok: Any, data: bytes) -> list[int]:
    """One byte-level BPE token per byte (GPT-2 byte-to-unicode mapping)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return tok.convert_tokens_to_ids([char[b] for b in data])


def _encode(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _run(
    tok: Any,
    ids: list[int],
    params: SamplingParams | None = None,
    sizes: list[int] | None = None,
    stop_terminated: bool = False,
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed ``ids`` in chunks of ``sizes`` (default 1), collecting streamed deltas."""
    det = IncrementalDetokenizer(tok, [0, 70, 71], params or SamplingParams())
    sizes = sizes or [1] * len(ids)
    deltas: list[str] = []
    matched: str | None = None
    pos = 0
    for size in sizes:
        piece, pos = ids[pos : pos + size], pos + size
        last = stop_terminated and pos >= len(ids)
        matched = det.update(piece, last)
        finished = matched is not None or last or pos >= len(ids)
        deltas.append(det.get_next_output_text(finished, delta=True))
        if finished:
            break
    else:
        deltas.append(det.get_next_output_text(True, delta=True))
    return det, deltas, matched


def _random_sizes(rng: random.Random, n: int) -> list[int]:
    sizes: list[int] = []
    while sum(sizes) < n:
        sizes.append(rng.randint(1, 6))
    return sizes


def test_stream_concatenates_to_decode_without_replacement_chars(tiny_tokenizer: Any) -> None:
    ids = _encode(tiny_tokenizer, TEXT)
    assert any(REPL in tiny_tokenizer.decode([i]) for i in ids)  # characters are split
    det, deltas, _ = _run(tiny_tokenizer, ids)
    assert not any(REPL in d for d in deltas)
    assert "".join(deltas) == det.output_text == tiny_tokenizer.decode(ids) == TEXT


def test_incomplete_character_is_held_back(tiny_tokenizer: Any) -> None:
    ids = _encode(tiny_tokenizer, "ok ") + _byte_ids(tiny_tokenizer, "😀".encode())
    det = IncrementalDetokenizer(tiny_tokenizer, [0], SamplingParams())
    det.update(ids[:-4], False)
    assert det.get_next_output_text(False, True) == "ok "
    for i in ids[-4:-1]:
        det.update([i], False)
        assert det.get_next_output_text(False, True) == ""
        assert det.output_text.endswith(REPL)  # the exact text so far shows the partial char
    det.update(ids[-1:], False)
    assert det.get_next_output_text(False, True) == "😀"
    assert det.output_text == "ok 😀"


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_three_tokens(tiny_tokenizer: Any, include: bool) -> None:
    text = "The quick brown fox jumps over the lazy dog, then runs back home again."
    ids = _encode(tiny_tokenizer, text)
    pieces = [tiny_tokenizer.decode([i]) for i in ids]
    assert "".join(pieces) == text

    def stop_at(j: int) -> str:  # last char of token j, all of token j + 1, first of j + 2
        return pieces[j][-1] + pieces[j + 1] + pieces[j + 2][:1]

    j = next(
        j
        for j in range(1, len(ids) - 3)
        if all(len(p) >= 2 for p in pieces[j : j + 3])
        and text.find(stop_at(j)) == len("".join(pieces[: j + 1])) - 1
    )
    stop = stop_at(j)
    start = text.find(stop)
    params = SamplingParams(stop=["zzz", stop], include_stop_str_in_output=include)
    det = IncrementalDetokenizer(tiny_tokenizer, [0], params)
    streamed = ""
    matched_at = -1
    for k, i in enumerate(ids):
        matched = det.update([i], False)
        if matched is not None:
            matched_at = k
            break
        streamed += det.get_next_output_text(False, True)
        assert stop not in streamed
        hold = 0 if include else len(stop) - 1
        assert streamed == det.output_text[: max(len(det.output_text) - hold, 0)]
    assert (matched_at, matched) == (j + 2, stop)
    expected = text[: start + len(stop)] if include else text[:start]
    streamed += det.get_next_output_text(True, True)
    assert streamed == det.output_text == expected
    assert det.update(_encode(tiny_tokenizer, " more"), False) is None  # ignored after a stop
    assert det.output_text == expected


def test_earliest_stop_wins_regardless_of_chunking(tiny_tokenizer: Any) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    ids = _encode(tiny_tokenizer, text)
    for stops, reason, out in [
        (["dog", "fox", "quick"], "quick", "The "),
        (["brown fox", "own"], "own", "The quick br"),  # "own" completes first
    ]:
        results = set()
        for sizes in ([1] * len(ids), [len(ids)], [3] * len(ids)):
            det, deltas, matched = _run(tiny_tokenizer, ids, SamplingParams(stop=stops), sizes)
            results.add((matched, det.output_text, "".join(deltas)))
        assert results == {(reason, out, out)}


def test_random_stop_strings_match_reference(tiny_tokenizer: Any) -> None:
    """Stop = first occurrence (by end, then start) in the decoded text, for any chunking."""
    rng = random.Random(11)
    alphabet = "ab cé你😀"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        ids = _encode(tiny_tokenizer, text)
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in "12"]
        include = rng.random() < 0.5
        hits = sorted((text.find(s) + len(s), text.find(s), s) for s in stops if s in text)
        expected: tuple[str | None, str] = (None, text)
        if hits:
            end, start, stop = hits[0]
            expected = (stop, text[: end if include else start])
        params = SamplingParams(stop=stops, include_stop_str_in_output=include)
        for sizes in ([1] * len(ids), _random_sizes(rng, len(ids))):
            det, deltas, matched = _run(tiny_tokenizer, ids, params, sizes)
            assert (matched, det.output_text) == expected, (text, stops, sizes)
            assert "".join(deltas) == det.output_text


def test_holdback_in_cumulative_mode(tiny_tokenizer: Any) -> None:
    det = IncrementalDetokenizer(tiny_tokenizer, [0], SamplingParams(stop=["XYZW"]))
    assert det.update(_encode(tiny_tokenizer, "hello world"), False) is None
    assert det.get_next_output_text(False, delta=False) == "hello wo"
    assert det.get_next_output_text(True, delta=False) == "hello world"


def test_stop_terminated_excludes_eos_and_flushes(tiny_tokenizer: Any) -> None:
    ids = _encode(tiny_tokenizer, "hi there") + [EOS_ID]
    params = SamplingParams(skip_special_tokens=False)
    for sizes in ([1] * len(ids), [len(ids)]):
        det, deltas, matched = _run(tiny_tokenizer, ids, params, sizes, stop_terminated=True)
        assert matched is None
        assert "".join(deltas) == det.output_text == "hi there"
    # A stop token id that is an ordinary token is not rendered either.
    word = _encode(tiny_tokenizer, " the")
    det, _, _ = _run(tiny_tokenizer, _encode(tiny_tokenizer, "hi") + word, stop_terminated=True)
    assert det.output_text == "hi"
    # Bytes held back for an incomplete character are flushed when the request ends.
    partial = _byte_ids(tiny_tokenizer, "😀".encode()[:2])
    det, deltas, _ = _run(tiny_tokenizer, partial + [EOS_ID], params, stop_terminated=True)
    assert "".join(deltas) == det.output_text == tiny_tokenizer.decode(partial)


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tiny_tokenizer: Any, skip: bool) -> None:
    ids = _encode(tiny_tokenizer, "hello") + [USER_ID] + _encode(tiny_tokenizer, " 世界") + [END_ID]
    det, deltas, _ = _run(tiny_tokenizer, ids, SamplingParams(skip_special_tokens=skip))
    expected = "hello 世界" if skip else "hello<|user|> 世界<|end|>"
    assert "".join(deltas) == det.output_text == expected
    assert tiny_tokenizer.decode(ids, skip_special_tokens=skip) == expected


def test_detokenize_false(tiny_tokenizer: Any) -> None:
    det = IncrementalDetokenizer(tiny_tokenizer, [0], SamplingParams(detokenize=False, stop="o"))
    assert det.update(_encode(tiny_tokenizer, "hello world"), False) is None
    assert det.update([EOS_ID], True) is None
    assert det.output_text == det.get_next_output_text(True, True) == ""


@pytest.mark.parametrize("python_only", [False, True])
@pytest.mark.parametrize("skip", [True, False])
def test_random_sequences_match_decode(tiny_tokenizer: Any, skip: bool, python_only: bool) -> None:
    tok = _PythonOnly(tiny_tokenizer) if python_only else tiny_tokenizer
    vocab = len(tiny_tokenizer)
    # Tokens whose bytes are all >= 0x80: lead/continuation bytes and pieces of characters.
    high = [
        i
        for i in range(6, vocab)
        if all(ord(c) >= 0xA1 for c in tiny_tokenizer.convert_ids_to_tokens(i))
    ]
    pools = [list(range(vocab)), high, list(range(6, vocab))]
    rng = random.Random(1234 + skip + 2 * python_only)
    params = SamplingParams(skip_special_tokens=skip)
    for _ in range(150):
        pool = pools[rng.randrange(3)]
        ids = [rng.choice(pool) for _ in range(rng.randint(0, 48))]
        expected = tiny_tokenizer.decode(ids, skip_special_tokens=skip)
        for sizes in ([1] * len(ids), _random_sizes(rng, len(ids))):
            det, deltas, _ = _run(tok, ids, params, sizes)
            assert det.output_text == "".join(deltas) == expected, (ids, sizes)


def test_random_valid_text_never_streams_replacement_chars(tiny_tokenizer: Any) -> None:
    rng = random.Random(7)
    alphabet = "ab Zé你好界😀🚀é—Жж\n.,"
    for _ in range(100):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        ids = _encode(tiny_tokenizer, text)
        for sizes in ([1] * len(ids), _random_sizes(rng, len(ids))):
            _, deltas, _ = _run(tiny_tokenizer, ids, SamplingParams(), sizes)
            assert "".join(deltas) == text
            assert not any(REPL in d for d in deltas)


@settings(max_examples=150, deadline=None)
@given(
    ids=st.lists(st.integers(0, 511), max_size=40),
    sizes=st.lists(st.integers(1, 5), min_size=40, max_size=40),
    skip=st.booleans(),
)
def test_chunked_feeding_matches_decode(
    tiny_tokenizer: Any, ids: list[int], sizes: list[int], skip: bool
) -> None:
    det, deltas, _ = _run(tiny_tokenizer, ids, SamplingParams(skip_special_tokens=skip), sizes)
    assert (
        det.output_text == "".join(deltas) == tiny_tokenizer.decode(ids, skip_special_tokens=skip)
    )


def test_decoding_window_stays_bounded(tiny_tokenizer: Any) -> None:
    """O(new tokens) per step: even a long run of invalid bytes never grows the window."""
    rng = random.Random(3)
    junk = _byte_ids(tiny_tokenizer, bytes(range(0x80, 0xC0)))  # stray continuation bytes
    ids = [rng.choice(junk) if rng.random() < 0.7 else rng.randrange(6, 512) for _ in range(3000)]
    det = IncrementalDetokenizer(tiny_tokenizer, [0], SamplingParams())
    dec = det._decoder
    assert dec is not None
    for i in ids:
        det.update([i], False)
        assert len(dec._ids) - dec._prefix <= 2 * detok_mod._FLUSH_HELD
    assert len(det.get_next_output_text(False, True)) > 0
    assert det.output_text == tiny_tokenizer.decode(ids)


def _metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece-style tokenizer: decoding drops the first token's leading space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    corpus = ["hello world, the quick brown fox jumps over the lazy dog. héllo wörld 你好"] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_first_token_space_matches_decode_of_output_ids() -> None:
    tok = _metaspace_tokenizer()
    ids = _encode(tok, "hello world the fox")
    prompt, output = ids[:1], ids[1:]
    assert tok.convert_ids_to_tokens(output)[0].startswith("\u2581")
    det = IncrementalDetokenizer(tok, prompt, SamplingParams())
    for i in output:
        det.update([i], False)
    assert det.output_text == tok.decode(output) == "world the fox"
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randint(0, 30))]
        for t in (tok, _PythonOnly(tok)):
            det, deltas, _ = _run(t, ids, SamplingParams(), _random_sizes(rng, len(ids)))
            assert det.output_text == "".join(deltas) == tok.decode(ids, skip_special_tokens=True)


def test_byte_level_first_token_keeps_its_space(tiny_tokenizer: Any) -> None:
    ids = _encode(tiny_tokenizer, "hello world")
    cut = next(
        k for k, t in enumerate(tiny_tokenizer.convert_ids_to_tokens(ids)) if t[0] == "\u0120"
    )
    det, deltas, _ = _run(tiny_tokenizer, ids[cut:])
    assert deltas[0].startswith(" ")
    assert det.output_text == tiny_tokenizer.decode(ids[cut:]) == " world"
