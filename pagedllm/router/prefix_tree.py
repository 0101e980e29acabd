"""``PrefixTree``: an approximate, multi-tenant radix tree of what was sent to each replica.

A router cannot see the replicas' KV caches, so it remembers what it sent where: every routed
prompt is inserted under the replica ("tenant") that got it, and a new prompt's longest match
says which replica most likely still holds its prefix. "Approximate" because the replicas evict
on their own schedule; the tree evicts too, per tenant, least recently inserted leaves first,
once a tenant holds more than its budget of elements.

Keys are sequences: ``str`` for the standalone router (character level, as SGLang's router),
``tuple`` of chained block hashes inside ``pagedllm serve``. An edge label is a slice of the
inserted sequence (a radix tree: one node per branching point, not per element), so a 2k-token
system prompt shared by a thousand requests costs one node.

Tenants are path-closed: a tenant on a node is on all its ancestors, so the tenants of the
deepest node a match reaches are exactly those with the longest match.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


class _Node:
    """One edge of the radix tree: ``label`` leads here from ``parent``; ``tenants`` maps each
    tenant whose inserted sequences pass through here to the clock of its last insert."""

    __slots__ = ("label", "parent", "children", "tenants")

    def __init__(self, label: Sequence[Hashable], parent: _Node | None) -> None:
        self.label = label
        self.parent = parent
        self.children: dict[Hashable, _Node] = {}
        self.tenants: dict[Hashable, int] = {}


def _common_len(label: Sequence[Hashable], seq: Sequence[Hashable], start: int) -> int:
    """How many leading elements ``label`` shares with ``seq[start:]``."""
    n = min(len(label), len(seq) - start)
    if label[:n] == seq[start : start + n]:  # the usual case, compared at C speed
        return n
    k = 0
    while k < n and label[k] == seq[start + k]:
        k += 1
    return k


@dataclass(frozen=True)
class PrefixMatch:
    """The longest prefix of a query found in the tree: its ``length`` in elements and the
    tenants that hold all of it."""

    length: int
    tenants: tuple[Hashable, ...]


class PrefixTree:
    """The multi-tenant radix tree (see the module docstring). ``max_size``: elements one
    tenant may hold; past it, its least recently inserted leaves are evicted down to
    ``EVICT_TO`` of the budget (hysteresis, so that eviction runs rarely)."""

    EVICT_TO = 0.75

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}.")
        self.max_size = max_size
        self._root = _Node((), None)
        self._sizes: dict[Hashable, int] = {}
        self._clock = itertools.count(1)

    def size(self, tenant: Hashable) -> int:
        """Elements ``tenant`` holds (shared edges count once per tenant)."""
        return self._sizes.get(tenant, 0)

    def insert(self, seq: Sequence[Hashable], tenant: Hashable) -> None:
        """Record that ``seq`` was sent to ``tenant`` (then evict if it is over budget)."""
        now = next(self._clock)
        node, i = self._root, 0
        node.tenants[tenant] = now
        self._sizes.setdefault(tenant, 0)
        while i < len(seq):
            child = node.children.get(seq[i])
            if child is None:
                child = _Node(seq[i:], node)
                node.children[seq[i]] = child
            else:
                k = _common_len(child.label, seq, i)
                if k < len(child.label):
                    child = self._split(child, k)
            if tenant not in child.tenants:
                self._sizes[tenant] += len(child.label)
            child.tenants[tenant] = now
            node, i = child, i + len(child.label)
        if self._sizes[tenant] > self.max_size:
            self.evict(tenant, int(self.max_size * self.EVICT_TO))

    def match(self, seq: Sequence[Hashable]) -> PrefixMatch:
        """The longest prefix of ``seq`` in the tree and who holds it."""
        node, i = self._root, 0
        while i < len(seq):
            child = node.children.get(seq[i])
            if child is None:
                break
            k = _common_len(child.label, seq, i)
            node, i = child, i + k
            if k < len(child.label):
                break
        return PrefixMatch(i, tuple(node.tenants) if i else ())

    def evict(self, tenant: Hashable, target: int) -> None:
        """Drop ``tenant``'s least recently inserted leaves until it holds <= ``target``."""
        heap = [(n.tenants[tenant], id(n), n) for n in self._leaves_of(tenant)]
        heapq.heapify(heap)
        while heap and self._sizes.get(tenant, 0) > target:
            _, _, node = heapq.heappop(heap)
            parent = self._drop(node, tenant)
            if parent is not None and parent is not self._root and self._is_leaf_of(parent, tenant):
                heapq.heappush(heap, (parent.tenants[tenant], id(parent), parent))

    def remove_tenant(self, tenant: Hashable) -> None:
        """Forget everything sent to ``tenant`` (a replica that died or left)."""
        for node in self._nodes_of(tenant):
            self._drop(node, tenant)
        self._root.tenants.pop(tenant, None)
        self._sizes.pop(tenant, None)

    def clear(self) -> None:
        self._root = _Node((), None)
        self._sizes.clear()

    # ---- internals -------------------------------------------------------------------------
    def _split(self, child: _Node, k: int) -> _Node:
        """Cut ``child``'s edge after ``k`` elements; return the new upper node."""
        parent = child.parent
        assert parent is not None
        mid = _Node(child.label[:k], parent)
        mid.tenants = dict(child.tenants)
        parent.children[mid.label[0]] = mid
        child.label = child.label[k:]
        child.parent = mid
        mid.children[child.label[0]] = child
        return mid

    def _drop(self, node: _Node, tenant: Hashable) -> _Node | None:
        """Remove ``tenant`` from ``node`` (a leaf of it); unlink the node once nobody holds
        it. Returns the parent."""
        del node.tenants[tenant]
        self._sizes[tenant] -= len(node.label)
        parent = node.parent
        if not node.tenants and parent is not None:
            del parent.children[node.label[0]]
        return parent

    def _is_leaf_of(self, node: _Node, tenant: Hashable) -> bool:
        return tenant in node.tenants and not any(
            tenant in c.tenants for c in node.children.values()
        )

    def _nodes_of(self, tenant: Hashable) -> list[_Node]:
        """``tenant``'s nodes below the root, children before their parents."""
        out: list[_Node] = []
        stack = [c for c in self._root.children.values() if tenant in c.tenants]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(c for c in node.children.values() if tenant in c.tenants)
        out.reverse()  # a parent is always appended before its children
        return out

    def _leaves_of(self, tenant: Hashable) -> list[_Node]:
        return [n for n in self._nodes_of(tenant) if self._is_leaf_of(n, tenant)]
