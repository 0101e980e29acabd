"""The scheduler's side of images: the per-step encoder budget cuts a prompt span before an
image it cannot afford (never inside one it has to encode), an image wholly behind cached
tokens costs nothing, and prefix-cache block keys include the images' content hashes."""

from __future__ import annotations

from pagedllm.core.scheduler import Scheduler
from pagedllm.core.scheduler_output import MultiModalFeature
from pagedllm.core.sequence import Sequence
from pagedllm.multimodal.encoder_cache import EncoderCache
from tests.core.scheduler_harness import make_config, make_params, scheduler_for

IMG = 99


def _seq(sid: str, layout: list[int | tuple[bytes, int]]) -> Sequence:
    """A sequence from text runs (int) and images (content hash, placeholder count)."""
    ids: list[int] = []
    feats = []
    for item in layout:
        if isinstance(item, int):
            ids.extend(range(1, item + 1))
        else:
            h, n = item
            feats.append(MultiModalFeature(len(ids), n, h, None, (1, 2, 2 * n)))
            ids.extend([IMG] * n)
    return Sequence(sid, ids, make_params(max_tokens=4), 4, mm_features=feats)


def _sched(encoder_budget: int, **kw: object) -> Scheduler:
    sched = scheduler_for(make_config(**kw), 64)
    sched.max_num_encoder_tokens = encoder_budget
    return sched


def _spans(sched: Scheduler) -> list[tuple[str, int, int]]:
    out = sched.schedule()
    return [(s.seq_id, s.num_computed_tokens, s.num_new_tokens) for s in out.scheduled]


def test_budget_cuts_before_an_unaffordable_image() -> None:
    sched = _sched(6, block_size=4)
    # text 3, image A (4 tokens), text 2, image B (4 tokens), text 3
    sched.add_sequence(_seq("a", [3, (b"A", 4), 2, (b"B", 4), 3]))
    assert _spans(sched) == [("a", 0, 9)]  # A fits (4 of 6); B would need 8: cut before it
    assert _spans(sched) == [("a", 9, 7)]  # the next step encodes B
    seq = sched.sequences["a"]
    assert seq.mm_done == 2


def test_budget_shared_by_the_step_and_no_cut_inside_an_image() -> None:
    sched = _sched(4, block_size=4)
    sched.add_sequence(_seq("a", [2, (b"A", 4), 2]))
    sched.add_sequence(_seq("b", [(b"B", 3), 2]))
    assert _spans(sched) == [("a", 0, 8)]  # b's image starts at 0: nothing of b fits
    assert ("b", 0, 5) in _spans(sched)  # the next step's budget is b's


def test_chunked_span_inside_an_encoded_image_costs_nothing() -> None:
    sched = _sched(4, block_size=4, max_num_batched_tokens=4)
    sched.add_sequence(_seq("a", [2, (b"A", 4), 2]))
    assert _spans(sched) == [("a", 0, 4)]  # reaches A: encoded now (4 of 4)
    assert sched._encoder_budget == 0
    assert _spans(sched) == [("a", 4, 4)]  # the rest of A: from the worker's cache
    assert sched._encoder_budget == 4


def test_block_keys_include_image_hashes() -> None:
    sched = _sched(64, block_size=4, enable_prefix_caching=True)
    kv = sched.kv
    same = [_seq(s, [3, (b"A", 6), 4]) for s in ("x", "y")]
    other = _seq("z", [3, (b"B", 6), 4])
    for s in (*same, other):
        kv._update_hashes(s)
    assert same[0].block_hashes == same[1].block_hashes
    assert other.block_hashes[0] != same[0].block_hashes[0]  # block 0 holds image token 3
    text = Sequence("t", same[0].prompt_token_ids, make_params(max_tokens=4), 4)
    kv._update_hashes(text)
    assert text.block_hashes[0] != same[0].block_hashes[0]  # no image: another key


def test_encoder_cache_lives_while_a_holder_does() -> None:
    cache = EncoderCache()
    cache.hold("a", [b"A"])
    cache.hold("b", [b"A", b"B"])
    cache.put(b"A", "embeds-A")  # type: ignore[arg-type]
    cache.put(b"C", "nobody")  # type: ignore[arg-type]
    assert cache.get(b"C") is None
    cache.release("a", [b"A"])
    assert cache.get(b"A") == "embeds-A"
    cache.release("b", [b"A", b"B"])
    assert cache.get(b"A") is None and len(cache) == 0
