"""Routing policies: cache_aware follows the longest prefix above its threshold, spreads new
prefixes to the smallest tree and falls back to the least loaded when the load is imbalanced
(both thresholds); round_robin and least_load; the Router's counts."""

from __future__ import annotations

import pytest

from pagedllm.router.policies import (
    CacheAwareConfig,
    CacheAwarePolicy,
    Router,
    build_policy,
)


def test_cache_aware_follows_the_prefix_and_spreads_new_ones() -> None:
    r = Router(CacheAwarePolicy(CacheAwareConfig(cache_threshold=0.5)), ["w0", "w1"])
    sys_a, sys_b = "A" * 100, "B" * 100
    first = r.route(sys_a + "q1", 102)
    r.done(first)
    second = r.route(sys_b + "q1", 102)  # no match: the replica with the smaller tree
    r.done(second)
    assert {first, second} == {"w0", "w1"}
    for i in range(5):
        assert r.route(f"{sys_a}x{i}", 102) == first
        assert r.route(f"{sys_b}x{i}", 102) == second
    assert r.routed == {first: 6, second: 6}


def test_below_the_threshold_goes_to_the_smallest_tree() -> None:
    r = Router(CacheAwarePolicy(CacheAwareConfig(cache_threshold=0.8)), ["w0", "w1"])
    assert r.route("abcdefghij", 10) == "w0"  # equal trees: the first in turn
    r.done("w0")
    # 5 of 10 match on w0 (0.5 <= 0.8): the smaller tree (w1) gets it.
    assert r.route("abcde01234", 10) == "w1"


def test_imbalance_needs_both_thresholds() -> None:
    cfg = CacheAwareConfig(cache_threshold=0.1, balance_abs_threshold=2, balance_rel_threshold=1.5)

    def choose(loads: dict[str, int]) -> object:
        pol = CacheAwarePolicy(cfg)
        pol.tree.insert("prefix", "w0")
        return pol.select("prefix!", 7, loads)

    # Difference 3 > 2 and 4 > 1.5 * 1: imbalanced -> the least loaded, despite the match.
    assert choose({"w0": 4, "w1": 1}) == "w1"
    # Difference 2 is not > 2: balanced -> the prefix holder.
    assert choose({"w0": 3, "w1": 1}) == "w0"
    # Difference 3 > 2 but 13 <= 1.5 * 10: balanced.
    assert choose({"w0": 13, "w1": 10}) == "w0"


def test_block_units_and_a_dead_replica_is_forgotten() -> None:
    pol = CacheAwarePolicy(CacheAwareConfig(cache_threshold=0.5), unit=16)
    r = Router(pol, [0, 1])
    key = (b"a", b"b", b"c", b"d")
    assert r.route(key, 70) == 0
    assert r.route(key, 70) == 0  # 4 blocks x 16 of 70 tokens > 0.5
    r.remove(0)
    assert r.route(key, 70) == 1 and pol.tree.size(0) == 0
    with pytest.raises(ValueError, match="No replica"):
        Router(pol, []).route(key, 70)


def test_round_robin_and_least_load() -> None:
    rr = Router(build_policy("round_robin"), ["a", "b", "c"])
    assert [rr.route("x", 1) for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]
    assert rr.route("x", 1, among=["a", "c"]) in {"a", "c"}
    ll = Router(build_policy("least_load"), ["a", "b"])
    assert ll.route("x", 1) == "a" and ll.route("x", 1) == "b"
    ll.done("a")
    assert ll.loads == {"a": 0, "b": 1}
    assert ll.route("x", 1) == "a"


def test_bad_names_and_thresholds() -> None:
    with pytest.raises(ValueError, match="Unknown routing policy 'random'"):
        build_policy("random")
    with pytest.raises(ValueError, match="cache_threshold"):
        CacheAwareConfig(cache_threshold=1.5)
    with pytest.raises(ValueError, match="balance_rel_threshold"):
        CacheAwareConfig(balance_rel_threshold=0.5)
