"""``PrefixTree``: longest matches per tenant, splits, per-tenant sizes, LRU eviction and the
removal of a tenant, on strings and on tuples of hashes alike."""

from __future__ import annotations

import random

import pytest

from pagedllm.router.prefix_tree import PrefixTree


def test_longest_match_and_its_holders() -> None:
    t = PrefixTree(1000)
    t.insert("hello world", "a")
    t.insert("hello there", "b")
    assert t.match("hello world!").length == 11
    assert t.match("hello world!").tenants == ("a",)
    m = t.match("hello wise")  # shared "hello " then "w" of a's edge
    assert (m.length, m.tenants) == (7, ("a",))
    m = t.match("hello")
    assert (m.length, set(m.tenants)) == (5, {"a", "b"})
    assert t.match("goodbye").length == 0 and t.match("goodbye").tenants == ()
    assert t.size("a") == 11 and t.size("b") == 11  # a shared edge counts for each holder


def test_matches_equal_a_brute_force_reference() -> None:
    rng = random.Random(0)
    t = PrefixTree(10**6)
    sent: dict[str, list[tuple[int, ...]]] = {"x": [], "y": [], "z": []}
    for _ in range(300):
        seq = tuple(rng.randrange(3) for _ in range(rng.randrange(1, 12)))
        who = rng.choice(list(sent))
        t.insert(seq, who)
        sent[who].append(seq)
    for _ in range(300):
        q = tuple(rng.randrange(3) for _ in range(rng.randrange(1, 14)))

        def common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
            k = 0
            while k < min(len(a), len(b)) and a[k] == b[k]:
                k += 1
            return k

        best = {w: max((common(q, s) for s in seqs), default=0) for w, seqs in sent.items()}
        top = max(best.values())
        m = t.match(q)
        assert m.length == top
        assert set(m.tenants) == ({w for w, b in best.items() if b == top} if top else set())
    for w, seqs in sent.items():  # size: distinct prefixes' elements, i.e. trie nodes
        nodes = {s[:k] for s in seqs for k in range(1, len(s) + 1)}
        assert t.size(w) == len(nodes)


def test_eviction_drops_the_least_recent_leaves_of_that_tenant_only() -> None:
    t = PrefixTree(20)
    t.insert("aaaaaaaaaa", "a")  # 10
    t.insert("bbbbbbbbbb", "a")  # 20
    t.insert("cccccccccc", "b")
    assert t.size("a") == 20
    t.match("aaaa")  # matching does not refresh anything
    t.insert("dddddddddd", "a")  # 30 > 20: evict down to 15 -> the two oldest leaves go
    assert t.size("a") == 10
    assert t.match("aaaaaaaaaa").tenants == () and t.match("bbb").tenants == ()
    assert t.match("dddddddddd").tenants == ("a",)
    assert t.match("cccccccccc").tenants == ("b",) and t.size("b") == 10


def test_evicting_a_leaf_keeps_the_shared_stem() -> None:
    t = PrefixTree(100)
    t.insert("systemXY", "a")
    t.insert("systemZW", "a")
    t.evict("a", 6)
    assert t.size("a") == 6 and t.match("systemQQ").length == 6


def test_remove_tenant() -> None:
    t = PrefixTree(100)
    t.insert((b"h1", b"h2", b"h3"), 0)
    t.insert((b"h1", b"h2", b"h4"), 1)
    t.remove_tenant(0)
    assert t.size(0) == 0
    assert t.match((b"h1", b"h2", b"h3")).tenants == (1,)
    assert t.match((b"h1", b"h2", b"h3")).length == 2


def test_bad_budget() -> None:
    with pytest.raises(ValueError, match="max_size"):
        PrefixTree(0)
