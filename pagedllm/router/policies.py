"""Routing policies: which replica gets a request, and the in-flight counts they read.

``cache_aware`` (the default) follows SGLang's router: it remembers what it sent to each
replica in a ``PrefixTree`` and

1. when the load is imbalanced, that is the busiest replica has more than
   ``balance_abs_threshold`` requests in flight beyond the idlest one AND more than
   ``balance_rel_threshold`` times its count, sends the request to the least-loaded replica;
2. otherwise matches the request against the tree: if the longest match covers more than
   ``cache_threshold`` of the request, it goes to the (least loaded) replica holding that
   match, whose prefix cache most likely still has it;
3. else to the replica with the smallest tree (the least cached work, so that new prefixes
   spread over the replicas), ties to the least loaded.

Either way the request is inserted under the chosen replica. Defaults are SGLang's current ones
(0.3, 64, 1.5). ``round_robin`` cycles over the live replicas; ``least_load`` takes the one
with the fewest requests in flight. ``Router`` keeps those counts (incremented when a request
is routed, decremented when it ends) and how many requests each replica got.
"""

from __future__ import annotations

import argparse
import itertools
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

from pagedllm.router.prefix_tree import PrefixTree

POLICIES = ("cache_aware", "round_robin", "least_load")


@dataclass(frozen=True)
class CacheAwareConfig:
    """The thresholds of ``cache_aware`` (see the module docstring)."""

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    max_tree_size: int = 2**22  # elements (characters or blocks) one replica's tree may hold

    def __post_init__(self) -> None:
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold}.")
        if self.balance_abs_threshold < 0:
            raise ValueError("balance_abs_threshold must be >= 0.")
        if self.balance_rel_threshold < 1.0:
            raise ValueError("balance_rel_threshold must be >= 1.")
        if self.max_tree_size < 1:
            raise ValueError("max_tree_size must be >= 1.")


class RoutingPolicy(ABC):
    """Chooses a replica for a request from its key (a sequence of hashable elements: block
    hashes or characters) and the live replicas' in-flight counts."""

    @abstractmethod
    def select(
        self, key: Sequence[Hashable], length: int, loads: Mapping[Hashable, int]
    ) -> Hashable:
        """One of ``loads``' keys (the live replicas, never empty). ``length``: the request's
        size in tokens or characters (the denominator of a match ratio)."""

    def forget(self, replica: Hashable) -> None:
        """``replica`` died or left: drop what is known about it."""
        return None

    def reset(self) -> None:
        """The replicas' caches were flushed."""
        return None


def _least_loaded(loads: Mapping[Hashable, int], order: int) -> Hashable:
    """The replica with the fewest requests in flight; ties rotate with ``order``."""
    cands = list(loads)
    n = len(cands)
    return min((cands[(order + i) % n] for i in range(n)), key=lambda r: loads[r])


class RoundRobinPolicy(RoutingPolicy):
    """Each live replica in turn, whatever the request."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def select(
        self, key: Sequence[Hashable], length: int, loads: Mapping[Hashable, int]
    ) -> Hashable:
        cands = list(loads)
        return cands[next(self._turn) % len(cands)]


class LeastLoadPolicy(RoutingPolicy):
    """The live replica with the fewest requests in flight (ties in turn)."""

    def __init__(self) -> None:
        self._turn = itertools.count()

    def select(
        self, key: Sequence[Hashable], length: int, loads: Mapping[Hashable, int]
    ) -> Hashable:
        return _least_loaded(loads, next(self._turn))


class CacheAwarePolicy(RoutingPolicy):
    """SGLang's cache-aware policy (module docstring). ``unit``: tokens (or characters) per key
    element, block_size for block hashes, 1 for text."""

    def __init__(self, config: CacheAwareConfig | None = None, *, unit: int = 1) -> None:
        self.config = config or CacheAwareConfig()
        self.unit = unit
        self.tree = PrefixTree(self.config.max_tree_size)
        self._turn = itertools.count()

    def imbalanced(self, loads: Mapping[Hashable, int]) -> bool:
        lo, hi = min(loads.values()), max(loads.values())
        cfg = self.config
        return hi - lo > cfg.balance_abs_threshold and hi > cfg.balance_rel_threshold * lo

    def select(
        self, key: Sequence[Hashable], length: int, loads: Mapping[Hashable, int]
    ) -> Hashable:
        turn = next(self._turn)
        if self.imbalanced(loads):
            choice = _least_loaded(loads, turn)
        else:
            match = self.tree.match(key)
            holders = {r: loads[r] for r in match.tenants if r in loads}
            ratio = match.length * self.unit / length if length > 0 else 0.0
            if holders and ratio > self.config.cache_threshold:
                choice = _least_loaded(holders, turn)
            else:
                cands = list(loads)
                n = len(cands)
                rotated = (cands[(turn + i) % n] for i in range(n))
                choice = min(rotated, key=lambda r: (self.tree.size(r), loads[r]))
        self.tree.insert(key, choice)
        return choice

    def forget(self, replica: Hashable) -> None:
        self.tree.remove_tenant(replica)

    def reset(self) -> None:
        self.tree.clear()


def build_policy(
    name: str, config: CacheAwareConfig | None = None, *, unit: int = 1
) -> RoutingPolicy:
    """The policy called ``name`` (one of ``POLICIES``)."""
    if name == "cache_aware":
        return CacheAwarePolicy(config, unit=unit)
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "least_load":
        return LeastLoadPolicy()
    raise ValueError(f"Unknown routing policy {name!r}; choose one of {', '.join(POLICIES)}.")


class Router:
    """A policy plus what it reads: requests in flight per replica (``loads``) and requests
    routed per replica (``routed``, for metrics). ``route`` counts a request in, ``done``
    counts it out; a replica that leaves is ``remove``d (its tree is forgotten)."""

    def __init__(self, policy: RoutingPolicy, replicas: Sequence[Hashable] = ()) -> None:
        self.policy = policy
        self.loads: dict[Hashable, int] = dict.fromkeys(replicas, 0)
        self.routed: Counter[Hashable] = Counter()

    def add(self, replica: Hashable) -> None:
        self.loads.setdefault(replica, 0)

    def remove(self, replica: Hashable) -> None:
        self.loads.pop(replica, None)
        self.policy.forget(replica)

    def route(
        self, key: Sequence[Hashable], length: int, among: Sequence[Hashable] | None = None
    ) -> Hashable:
        """Choose a replica (from ``among``, default every known one) and count the request
        in. ValueError when there is none to choose from."""
        names = self.loads if among is None else [r for r in among if r in self.loads]
        cands = {r: self.loads[r] for r in names}
        if not cands:
            raise ValueError("No replica is available.")
        choice = self.policy.select(key, length, cands)
        self.loads[choice] += 1
        self.routed[choice] += 1
        return choice

    def done(self, replica: Hashable) -> None:
        if self.loads.get(replica, 0) > 0:
            self.loads[replica] -= 1


def add_policy_args(group: argparse._ArgumentGroup, prefix: str = "") -> None:
    """The policy flags: ``--{prefix}policy`` and the cache-aware thresholds (``prefix``:
    "router-" on ``serve``, "" on ``pagedllm router``, SGLang's spelling)."""
    d = CacheAwareConfig()
    group.add_argument(
        f"--{prefix}policy",
        choices=POLICIES,
        default="cache_aware",
        help="how requests are spread over the replicas: cache_aware (longest prefix sent "
        "before, unless the load is imbalanced), round_robin or least_load (fewest in flight)",
    )
    group.add_argument(
        f"--{prefix}cache-threshold",
        type=float,
        default=d.cache_threshold,
        help="cache_aware: a request goes to the replica holding its longest prefix when that "
        f"prefix covers more than this fraction of it (default {d.cache_threshold})",
    )
    group.add_argument(
        f"--{prefix}balance-abs-threshold",
        type=int,
        default=d.balance_abs_threshold,
        help="cache_aware: the load is imbalanced (route to the least loaded) when the busiest "
        "replica has more than this many requests in flight beyond the idlest ... "
        f"(default {d.balance_abs_threshold})",
    )
    group.add_argument(
        f"--{prefix}balance-rel-threshold",
        type=float,
        default=d.balance_rel_threshold,
        help=f"... and more than this many times its count (default {d.balance_rel_threshold})",
    )
    group.add_argument(
        f"--{prefix}max-tree-size",
        type=int,
        default=d.max_tree_size,
        help="cache_aware: elements (characters, or KV blocks inside serve) remembered per "
        f"replica before the least recent are evicted (default {d.max_tree_size})",
    )


def policy_config_from_args(args: argparse.Namespace, prefix: str = "") -> CacheAwareConfig:
    p = prefix.replace("-", "_")
    return CacheAwareConfig(
        cache_threshold=getattr(args, f"{p}cache_threshold"),
        balance_abs_threshold=getattr(args, f"{p}balance_abs_threshold"),
        balance_rel_threshold=getattr(args, f"{p}balance_rel_threshold"),
        max_tree_size=getattr(args, f"{p}max_tree_size"),
    )
