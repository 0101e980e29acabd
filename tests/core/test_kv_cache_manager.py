"""Property-based tests of `KVCacheManager`: prefix-cache hits, forks, ownership and freeing.

Sequences are driven by hand (allocate, mark tokens computed, commit) without a scheduler, so
each property pins down one piece of the manager's contract: a prefix hit needs identical
*leading* full blocks (the hash is chained), at least one token is always left to compute,
forks share blocks through ref counts, and freeing everything returns the pool to empty.
"""

from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from pagedllm.core.kv_cache_manager import KVCacheManager, cdiv
from pagedllm.core.sequence import Sequence
from pagedllm.sampling_params import SamplingParams

BLOCK_SIZES = st.sampled_from([1, 2, 4, 16])
TOKENS = st.integers(0, 2)  # a tiny vocabulary: shared prefixes are common
_ids = itertools.count()


def make_seq(prompt: list[int], **params: object) -> Sequence:
    sp = SamplingParams(max_tokens=8, ignore_eos=True, **params)  # type: ignore[arg-type]
    sp.update_from_generation_config(set())
    return Sequence(f"r{next(_ids)}", list(prompt), sp, max_tokens=8)


def compute_all(kv: KVCacheManager, req: Sequence) -> int:
    """Admit ``req`` like the scheduler does and compute its whole prompt; returns hit blocks."""
    cached = kv.find_cached_prefix(req)
    num_cached = len(cached) * kv.block_size
    assert kv.allocate(req, req.num_tokens - num_cached, cached)
    req.num_computed_tokens = req.num_tokens
    kv.commit_computed(req)
    return len(cached)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def check_ownership(kv: KVCacheManager) -> None:
    """Every reference is owned by exactly one block-table entry; free list == ref count 0."""
    owners = Counter(b.block_id for blocks in kv.seq_blocks.values() for b in blocks)
    for b in kv.pool.blocks:
        assert b.ref_cnt == owners.get(b.block_id, 0), f"block {b.block_id}"
        assert (b.ref_cnt == 0) == (b.block_id in kv.pool.free)
    for blocks in kv.seq_blocks.values():
        assert len({b.block_id for b in blocks}) == len(blocks), "block twice in one table"


def check_shared_content(kv: KVCacheManager, reqs: list[Sequence]) -> None:
    """A block in several tables sits at the same index and holds the same computed tokens."""
    bs = kv.block_size
    seen: dict[int, tuple[int, list[int]]] = {}
    for req in reqs:
        for i, b in enumerate(kv.seq_blocks[req.seq_id]):
            if b.ref_cnt > 1:
                assert (i + 1) * bs <= req.num_computed_tokens, "shared block is not full"
            content = req.all_token_ids[: (i + 1) * bs]
            if b.block_id in seen:
                assert seen[b.block_id] == (i, content), f"block {b.block_id} content differs"
            seen[b.block_id] = (i, content)


def check_all_free(kv: KVCacheManager) -> None:
    assert kv.seq_blocks == {} and kv.num_registered == {}
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert kv.pool.num_free_blocks == kv.pool.num_blocks


# ---- prefix hits ---------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    bs=BLOCK_SIZES,
    a=st.lists(TOKENS, min_size=1, max_size=40),
    b=st.lists(TOKENS, min_size=1, max_size=40),
    free_first=st.booleans(),
)
def test_prefix_hit_is_exactly_the_shared_leading_full_blocks(
    bs: int, a: list[int], b: list[int], free_first: bool
) -> None:
    kv = KVCacheManager(64, bs, enable_prefix_caching=True)
    ra = make_seq(a)
    assert compute_all(kv, ra) == 0  # an empty cache has nothing to give
    a_blocks = list(kv.seq_blocks[ra.seq_id])
    if free_first:
        kv.free(ra)  # freed blocks keep their hashes (nothing else allocates in between)
    rb = make_seq(b)
    hits = kv.find_cached_prefix(rb)
    expected = min(common_prefix(a, b) // bs, len(a) // bs, (len(b) - 1) // bs)
    assert len(hits) == expected
    assert [h.block_id for h in hits] == [x.block_id for x in a_blocks[:expected]]
    assert len(hits) <= (rb.num_tokens - 1) // bs  # at least one token left to compute


@settings(max_examples=80, deadline=None)
@given(
    bs=BLOCK_SIZES,
    head_a=st.lists(TOKENS, min_size=1, max_size=16),
    head_b=st.lists(TOKENS, min_size=1, max_size=16),
    tail=st.lists(TOKENS, min_size=1, max_size=32),
)
def test_same_block_after_different_prefix_never_hits(
    bs: int, head_a: list[int], head_b: list[int], tail: list[int]
) -> None:
    """The chained hash: block content equal, but what came before differs -> no hit."""
    # Pad the heads to whole blocks that differ in their first block.
    head_a = (head_a * bs)[:bs]
    head_b = [(t + 1) % 3 for t in head_a]
    a, b = head_a + tail, head_b + tail
    kv = KVCacheManager(64, bs, enable_prefix_caching=True)
    compute_all(kv, make_seq(a))
    assert kv.find_cached_prefix(make_seq(b)) == []
    # ... while the identical prompt hits every full block but the last token's.
    assert len(kv.find_cached_prefix(make_seq(a))) == (len(a) - 1) // bs


@settings(max_examples=80, deadline=None)
@given(
    bs=BLOCK_SIZES,
    prompts=st.lists(st.lists(TOKENS, min_size=1, max_size=24), min_size=1, max_size=6),
    query=st.lists(TOKENS, min_size=1, max_size=24),
)
def test_hit_is_longest_cached_prefix_among_many(
    bs: int, prompts: list[list[int]], query: list[int]
) -> None:
    kv = KVCacheManager(128, bs, enable_prefix_caching=True)
    reqs = [make_seq(p) for p in prompts]
    for r in reqs:
        compute_all(kv, r)
    check_ownership(kv)
    best = max(min(common_prefix(p, query) // bs, len(p) // bs) for p in prompts)
    hits = kv.find_cached_prefix(make_seq(query))
    assert len(hits) == min(best, (len(query) - 1) // bs)
    for r in reqs:
        kv.free(r)
    check_all_free(kv)


@settings(max_examples=40, deadline=None)
@given(bs=BLOCK_SIZES, a=st.lists(TOKENS, min_size=1, max_size=40))
def test_no_hits_when_disabled_or_prompt_logprobs(bs: int, a: list[int]) -> None:
    kv = KVCacheManager(64, bs, enable_prefix_caching=False)
    compute_all(kv, make_seq(a))
    assert kv.find_cached_prefix(make_seq(a)) == []
    assert kv.pool.cached == {}
    kv2 = KVCacheManager(64, bs, enable_prefix_caching=True)
    compute_all(kv2, make_seq(a))
    assert kv2.find_cached_prefix(make_seq(a, prompt_logprobs=1)) == []


@settings(max_examples=80, deadline=None)
@given(
    bs=BLOCK_SIZES,
    a=st.lists(TOKENS, min_size=1, max_size=40),
    extra=st.integers(0, 4),
    m=st.integers(0, 20),
)
def test_eviction_takes_the_tail_first(bs: int, a: list[int], extra: int, m: int) -> None:
    """A freed sequence's blocks are evicted tail first, so its cached prefix stays contiguous."""
    k = cdiv(len(a), bs)
    num_blocks = k + extra
    kv = KVCacheManager(num_blocks, bs, enable_prefix_caching=True)
    ra = make_seq(a)
    compute_all(kv, ra)
    a_blocks = list(kv.seq_blocks[ra.seq_id])
    kv.free(ra)
    m = min(m, num_blocks)
    filler = make_seq([9] * (m * bs))
    if m:
        assert kv.allocate(filler, m * bs)
    evicted_of_a = max(0, m - extra)
    still = [x.block_hash is not None for x in a_blocks[: len(a) // bs]]
    survivors = max(0, k - evicted_of_a)
    full = len(a) // bs
    assert still == [i < survivors for i in range(full)]
    hits = kv.find_cached_prefix(make_seq(a))
    assert len(hits) == min(survivors, full, (len(a) - 1) // bs)
    assert not {h.block_id for h in hits} & set(kv.block_ids(filler.seq_id))
    kv.free(filler)
    check_all_free(kv)


# ---- allocation, forks and freeing ---------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    bs=BLOCK_SIZES,
    prompt=st.lists(TOKENS, min_size=1, max_size=40),
    num_blocks=st.integers(1, 12),
    chunks=st.lists(st.integers(1, 9), min_size=1, max_size=8),
)
def test_allocate_is_all_or_nothing(
    bs: int, prompt: list[int], num_blocks: int, chunks: list[int]
) -> None:
    kv = KVCacheManager(num_blocks, bs, enable_prefix_caching=True)
    req = make_seq(prompt)
    for c in chunks:
        c = min(c, req.num_tokens - req.num_computed_tokens)
        if c == 0:
            break
        before = (kv.block_ids(req.seq_id), kv.pool.num_free_blocks)
        ok = kv.allocate(req, c)
        need = cdiv(req.num_computed_tokens + c, bs)
        assert ok == (need <= num_blocks)
        if not ok:
            assert (kv.block_ids(req.seq_id), kv.pool.num_free_blocks) == before
            break
        assert len(kv.block_ids(req.seq_id)) == need
        req.num_computed_tokens += c
        kv.commit_computed(req)
        check_ownership(kv)
    kv.free(req)
    check_all_free(kv)


@settings(max_examples=100, deadline=None)
@given(
    bs=BLOCK_SIZES,
    prompt=st.lists(TOKENS, min_size=1, max_size=40),
    n_children=st.integers(1, 3),
    caching=st.booleans(),
    free_order=st.permutations(range(4)),
)
def test_fork_shares_full_blocks_with_ref_counts(
    bs: int, prompt: list[int], n_children: int, caching: bool, free_order: list[int]
) -> None:
    kv = KVCacheManager(64, bs, enable_prefix_caching=caching)
    parent = make_seq(prompt)
    compute_all(kv, parent)
    children = [make_seq(prompt) for _ in range(n_children)]
    k = len(prompt) // bs
    for child in children:
        kv.fork(parent, child)
        assert child.num_computed_tokens == k * bs
        assert kv.block_ids(child.seq_id) == kv.block_ids(parent.seq_id)[:k]
    parent_blocks = kv.seq_blocks[parent.seq_id]
    for i, b in enumerate(parent_blocks):
        assert b.ref_cnt == (1 + n_children if i < k else 1)
    check_ownership(kv)
    # Children diverge: each appends its own token and computes its own tail.
    for j, child in enumerate(children):
        child.append_output_token(50 + j)
        assert kv.allocate(child, child.num_tokens - child.num_computed_tokens)
        child.num_computed_tokens = child.num_tokens
        kv.commit_computed(child)
        tail = kv.seq_blocks[child.seq_id][k:]
        assert all(b.ref_cnt == 1 for b in tail), "a child's own blocks must not be shared"
    check_ownership(kv)
    seqs = [parent, *children]
    for i in free_order:
        if i < len(seqs):
            kv.free(seqs[i])
            check_ownership(kv)
    check_all_free(kv)


@st.composite
def manager_script(draw: st.DrawFn) -> tuple[int, int, bool, list[tuple[str, int, list[int]]]]:
    bs = draw(BLOCK_SIZES)
    num_blocks = draw(st.integers(1, 24))
    caching = draw(st.booleans())
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["new", "step", "fork", "free"]),
                st.integers(0, 7),
                st.lists(TOKENS, min_size=1, max_size=3 * bs + 3),
            ),
            max_size=30,
        )
    )
    return bs, num_blocks, caching, ops


@settings(max_examples=150, deadline=None)
@given(script=manager_script())
def test_random_workload_keeps_ownership_and_frees_everything(
    script: tuple[int, int, bool, list[tuple[str, int, list[int]]]],
) -> None:
    bs, num_blocks, caching, ops = script
    kv = KVCacheManager(num_blocks, bs, enable_prefix_caching=caching)
    live: list[Sequence] = []
    for op, pick, tokens in ops:
        if op == "new":
            req = make_seq(tokens)
            cached = kv.find_cached_prefix(req)
            assert len(cached) <= (req.num_tokens - 1) // bs
            num_cached = len(cached) * bs
            if kv.allocate(req, req.num_tokens - num_cached, cached):
                req.num_computed_tokens = req.num_tokens
                kv.commit_computed(req)
                live.append(req)
            else:
                assert req.seq_id not in kv.seq_blocks
        elif live and op == "step":  # append a token and compute everything pending
            req = live[pick % len(live)]
            req.append_output_token(tokens[0])
            if kv.allocate(req, req.num_tokens - req.num_computed_tokens):
                req.num_computed_tokens = req.num_tokens
                kv.commit_computed(req)
            else:
                kv.free(req)
                live.remove(req)
        elif live and op == "fork":
            parent = live[pick % len(live)]
            child = make_seq(parent.all_token_ids)
            kv.fork(parent, child)
            live.append(child)
        elif live and op == "free":
            kv.free(live.pop(pick % len(live)))
        check_ownership(kv)
        check_shared_content(kv, live)
        for req in live:  # every table covers the computed tokens and nothing more
            assert len(kv.seq_blocks[req.seq_id]) == cdiv(req.num_computed_tokens, bs)
        for h, b in kv.pool.cached.items():
            assert b.block_hash == h
    for req in live:
        kv.free(req)
    check_all_free(kv)
