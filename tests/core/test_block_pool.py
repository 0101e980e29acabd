"""Property-based tests of `BlockPool`: ref counts, the LRU free list and the prefix-hash index.

A `RuleBasedStateMachine` drives random allocate / touch / release / register / lookup calls
against a tiny reference model of the pool (ref counts, free-list order, hash index) and checks
after every step that the two agree and that the pool's own bookkeeping is consistent.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from pagedllm.core.block_pool import BlockPool, KVBlock, hash_block

HASHES = [hash_block(None, [i]) for i in range(12)]


class BlockPoolMachine(RuleBasedStateMachine):
    """Random pool operations checked step by step against a reference model."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(1)
        self.ref: dict[int, int] = {}
        self.free_order: list[int] = []
        self.index: dict[bytes, int] = {}  # hash -> block id
        self.block_hash: dict[int, bytes] = {}  # block id -> hash
        self.evicted: set[bytes] = set()

    @initialize(num_blocks=st.integers(1, 10))
    def setup(self, num_blocks: int) -> None:
        self.pool = BlockPool(num_blocks)
        self.ref = {i: 0 for i in range(num_blocks)}
        self.free_order = list(range(num_blocks))

    # ---- helpers -----------------------------------------------------------------------
    def _held(self) -> list[int]:
        return sorted(b for b, c in self.ref.items() if c > 0)

    def _blocks(self, ids: list[int]) -> list[KVBlock]:
        return [self.pool.blocks[i] for i in ids]

    # ---- rules -------------------------------------------------------------------------
    @rule(n=st.integers(0, 12))
    def allocate(self, n: int) -> None:
        if n > len(self.free_order):
            with pytest.raises(RuntimeError):
                self.pool.allocate(n)
            return  # the invariants check that nothing changed
        before = {i: self.pool.blocks[i].ref_cnt for i in range(self.pool.num_blocks)}
        got = self.pool.allocate(n)
        ids = [b.block_id for b in got]
        # Least recently freed first, never a block somebody still holds.
        assert ids == self.free_order[:n]
        assert all(before[i] == 0 for i in ids), "handed out a block that is still referenced"
        assert len(set(ids)) == len(ids)
        del self.free_order[:n]
        for i in ids:
            self.ref[i] = 1
            h = self.block_hash.pop(i, None)
            if h is not None:  # reallocation evicts the block's cached hash
                del self.index[h]
                self.evicted.add(h)
        assert all(b.block_hash is None and b.ref_cnt == 1 for b in got)

    @precondition(lambda self: self.pool.num_blocks > 0)
    @rule(data=st.data())
    def touch(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.integers(0, self.pool.num_blocks - 1), max_size=4, unique=True))
        self.pool.touch(self._blocks(ids))
        for i in ids:
            if self.ref[i] == 0:
                self.free_order.remove(i)
            self.ref[i] += 1

    @precondition(lambda self: any(c > 0 for c in self.ref.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        held = self._held()
        ids = data.draw(st.lists(st.sampled_from(held), min_size=1, unique=True))
        ids = data.draw(st.permutations(ids))
        self.pool.release(self._blocks(ids))
        for i in ids:
            self.ref[i] -= 1
            if self.ref[i] == 0:
                self.free_order.append(i)

    @precondition(lambda self: any(c == 0 for c in self.ref.values()))
    @rule(data=st.data())
    def release_free_block_raises(self, data: st.DataObject) -> None:
        i = data.draw(st.sampled_from(sorted(b for b, c in self.ref.items() if c == 0)))
        with pytest.raises(RuntimeError):
            self.pool.release([self.pool.blocks[i]])

    @precondition(lambda self: any(c > 0 for c in self.ref.values()))
    @rule(data=st.data(), h=st.sampled_from(HASHES))
    def register(self, data: st.DataObject, h: bytes) -> None:
        i = data.draw(st.sampled_from(self._held()))
        self.pool.register(self.pool.blocks[i], h)
        if i not in self.block_hash and h not in self.index:  # first writer wins
            self.block_hash[i] = h
            self.index[h] = i
            self.evicted.discard(h)

    @rule(h=st.sampled_from(HASHES))
    def lookup(self, h: bytes) -> None:
        got = self.pool.lookup(h)
        if h in self.index:
            assert got is not None and got.block_id == self.index[h]
        else:
            assert got is None
        if h in self.evicted:
            assert got is None, "lookup found a hash whose block was reallocated"

    @rule()
    def reset_prefix_cache(self) -> None:
        ok = self.pool.reset_prefix_cache()
        assert ok == all(c == 0 for c in self.ref.values())
        if ok:
            self.index.clear()
            self.block_hash.clear()

    # ---- invariants --------------------------------------------------------------------
    @invariant()
    def counts_add_up(self) -> None:
        pool = self.pool
        in_use = sum(1 for b in pool.blocks if b.ref_cnt > 0)
        assert pool.num_free_blocks + in_use == pool.num_blocks
        assert 0.0 <= pool.usage <= 1.0

    @invariant()
    def matches_model(self) -> None:
        pool = self.pool
        assert {b.block_id: b.ref_cnt for b in pool.blocks} == self.ref
        assert list(pool.free) == self.free_order
        assert all(b.ref_cnt == 0 for b in pool.free.values())
        assert {h: b.block_id for h, b in pool.cached.items()} == self.index
        for b in pool.blocks:
            assert b.block_hash == self.block_hash.get(b.block_id)
        for h, b in pool.cached.items():
            assert b.block_hash == h


TestBlockPoolMachine = BlockPoolMachine.TestCase
TestBlockPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ---- focused properties --------------------------------------------------------------------


def test_zero_blocks_rejected() -> None:
    with pytest.raises(ValueError):
        BlockPool(0)


@settings(max_examples=60, deadline=None)
@given(num_blocks=st.integers(1, 16), data=st.data())
def test_allocate_returns_least_recently_freed_first(num_blocks: int, data: st.DataObject) -> None:
    pool = BlockPool(num_blocks)
    blocks = pool.allocate(num_blocks)
    assert pool.num_free_blocks == 0
    order = data.draw(st.permutations(blocks))
    pool.release(order)
    again = pool.allocate(num_blocks)
    assert [b.block_id for b in again] == [b.block_id for b in order]


@settings(max_examples=60, deadline=None)
@given(num_blocks=st.integers(2, 16), data=st.data())
def test_hash_evicted_exactly_when_block_reallocated(num_blocks: int, data: st.DataObject) -> None:
    pool = BlockPool(num_blocks)
    blocks = pool.allocate(num_blocks)
    hashes = [hash_block(None, [i]) for i in range(num_blocks)]
    for b, h in zip(blocks, hashes, strict=True):
        pool.register(b, h)
    order = data.draw(st.permutations(blocks))
    pool.release(order)
    # Freed blocks keep their hashes: a later request can take them back.
    for b, h in zip(blocks, hashes, strict=True):
        assert pool.lookup(h) is b
    k = data.draw(st.integers(0, num_blocks))
    taken = pool.allocate(k)
    taken_ids = {b.block_id for b in taken}
    assert taken_ids == {b.block_id for b in order[:k]}
    for b, h in zip(blocks, hashes, strict=True):
        if b.block_id in taken_ids:
            assert pool.lookup(h) is None and b.block_hash is None
        else:
            assert pool.lookup(h) is b and b.block_hash == h


def test_touch_revives_cached_free_block() -> None:
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    h = hash_block(None, [7])
    pool.register(b, h)
    pool.release([a, b, c])
    pool.touch([b])  # prefix hit on a freed block: it leaves the free list, keeps its hash
    assert b.ref_cnt == 1 and pool.num_free_blocks == 2 and pool.lookup(h) is b
    assert [x.block_id for x in pool.allocate(2)] == [a.block_id, c.block_id]
    assert pool.lookup(h) is b
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_register_first_writer_wins() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    h1, h2 = hash_block(None, [1]), hash_block(None, [2])
    pool.register(a, h1)
    pool.register(b, h1)  # same content in another block: not indexed twice
    assert pool.lookup(h1) is a and b.block_hash is None
    pool.register(a, h2)  # a block keeps its first hash
    assert a.block_hash == h1 and pool.lookup(h2) is None


@settings(max_examples=60, deadline=None)
@given(
    p1=st.lists(st.integers(0, 3), min_size=1, max_size=4),
    p2=st.lists(st.integers(0, 3), min_size=1, max_size=4),
    block=st.lists(st.integers(0, 3), min_size=1, max_size=4),
)
def test_hash_block_is_chained(p1: list[int], p2: list[int], block: list[int]) -> None:
    h1, h2 = hash_block(None, p1), hash_block(None, p2)
    assert (h1 == h2) == (p1 == p2)
    # The same block content after different parents must hash differently.
    assert (hash_block(h1, block) == hash_block(h2, block)) == (p1 == p2)
    assert hash_block(h1, block) != hash_block(None, block)
