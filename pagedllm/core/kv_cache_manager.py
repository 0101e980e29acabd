"""Per-request block tables on top of the block pool, with automatic prefix caching."""

from __future__ import annotations

from pagedllm.core.block_pool import BlockPool, KVBlock, hash_block
from pagedllm.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Gives each request the blocks its tokens need and shares full blocks by content hash."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.num_registered: dict[str, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up (counted by the scheduler on admission)
        self.prefix_hits = 0  # of those, tokens served from the cache

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]

    def _update_hashes(self, req: Request) -> None:
        bs = self.block_size
        for i in range(len(req.block_hashes), req.num_tokens // bs):
            parent = req.block_hashes[-1] if i else None
            req.block_hashes.append(hash_block(parent, req.all_token_ids[i * bs : (i + 1) * bs]))

    def find_cached_prefix(self, req: Request) -> list[KVBlock]:
        """Longest run of cached full blocks matching the request's leading tokens.

        At least one token is always left to compute (its logits are needed). Requests that
        ask for prompt logprobs skip the lookup (cached positions would have none).
        """
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return []
        self._update_hashes(req)
        hits: list[KVBlock] = []
        for block_hash in req.block_hashes[: (req.num_tokens - 1) // self.block_size]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(
        self, req: Request, num_new_tokens: int, cached: list[KVBlock] | None = None
    ) -> bool:
        """Make room for ``num_new_tokens`` more tokens after the computed (and cached) ones.

        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        cached = cached or []
        blocks = self.req_blocks.setdefault(req.request_id, [])
        total = req.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        need = cdiv(total, self.block_size) - len(blocks) - len(cached)
        reviving = sum(1 for b in cached if b.ref_cnt == 0)  # cached blocks now on the free list
        if need > self.pool.num_free_blocks - reviving:
            if not blocks:
                del self.req_blocks[req.request_id]
            return False
        if cached:
            self.pool.touch(cached)
            blocks.extend(cached)
            self.num_registered[req.request_id] = len(blocks)
        if need > 0:
            blocks.extend(self.pool.allocate(need))
        return True

    def commit_computed(self, req: Request, num_computed: int | None = None) -> None:
        """Index the request's blocks now full of computed tokens (the first ``num_computed``,
        default all computed ones)."""
        if not self.enable_prefix_caching or req.request_id not in self.req_blocks:
            return
        if num_computed is None:
            num_computed = req.num_computed_tokens
        start = self.num_registered.get(req.request_id, 0)
        end = min(num_computed, req.num_tokens) // self.block_size
        if end <= start:
            return
        self._update_hashes(req)
        blocks = self.req_blocks[req.request_id]
        for i in range(start, end):
            self.pool.register(blocks[i], req.block_hashes[i])
        self.num_registered[req.request_id] = end

    def fork(self, parent: Request, child: Request, num_computed: int | None = None) -> None:
        """Let ``child`` start from the full blocks of ``parent``'s first ``num_computed``
        tokens (shared, ref-counted); a parent without blocks (preempted) shares none."""
        if num_computed is None:
            num_computed = parent.num_computed_tokens
        k = num_computed // self.block_size
        shared = self.req_blocks.get(parent.request_id, [])[:k]
        k = len(shared)
        self.pool.touch(shared)
        self.req_blocks[child.request_id] = list(shared)
        self.num_registered[child.request_id] = min(
            self.num_registered.get(parent.request_id, 0), k
        )
        child.block_hashes = parent.block_hashes[:k]
        child.num_computed_tokens = k * self.block_size

    def free(self, req: Request) -> None:
        """Return the request's blocks; the tail goes first so it is evicted first."""
        blocks = self.req_blocks.pop(req.request_id, [])
        self.num_registered.pop(req.request_id, None)
        self.pool.release(reversed(blocks))

    def max_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)
