"""Per-request block tables on top of the block pool, with automatic prefix caching.

A block's prefix-cache key chains its parent's key and its token ids; a block that holds image
placeholder tokens adds the content hash of each such image, so the same image in a later
request is a hit and a different one (same placeholder ids) never is.
"""

from __future__ import annotations

from pagedllm.core.block_pool import BlockPool, KVBlock, hash_block
from pagedllm.core.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Gives each request the blocks its tokens need and shares full blocks by content hash."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.seq_blocks: dict[str, list[KVBlock]] = {}
        self.num_registered: dict[str, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up (counted by the scheduler on admission)
        self.prefix_hits = 0  # of those, tokens served from the cache

    @property
    def usage(self) -> float:
        return self.pool.usage

    def num_blocks_of(self, seq_id: str) -> int:
        return len(self.seq_blocks.get(seq_id, ()))

    def block_ids_from(self, seq_id: str, start: int) -> list[int]:
        """Block ids of ``seq_id`` from table position ``start`` on."""
        return [b.block_id for b in self.seq_blocks.get(seq_id, [])[start:]]

    def block_ids(self, seq_id: str) -> list[int]:
        return [b.block_id for b in self.seq_blocks.get(seq_id, [])]

    def _update_hashes(self, seq: Sequence) -> None:
        bs = self.block_size
        feats = seq.mm_features
        for i in range(len(seq.block_hashes), seq.num_tokens // bs):
            parent = seq.block_hashes[-1] if i else None
            lo, hi = i * bs, (i + 1) * bs
            extra = [f.content_hash for f in feats if f.offset < hi and f.end > lo] if feats else ()
            seq.block_hashes.append(hash_block(parent, seq.all_token_ids[lo:hi], extra))

    def find_cached_prefix(self, seq: Sequence) -> list[KVBlock]:
        """Longest run of cached full blocks matching the request's leading tokens.

        At least one token is always left to compute (its logits are needed). A sequence that
        asks for prompt logprobs takes cached blocks only before ``prompt_logprobs_start``
        (cached positions would have no logits).
        """
        if not self.enable_prefix_caching:
            return []
        usable = seq.num_tokens - 1
        if seq.params.prompt_logprobs is not None:
            usable = min(usable, seq.params.prompt_logprobs_start)
        self._update_hashes(seq)
        hits: list[KVBlock] = []
        for block_hash in seq.block_hashes[: usable // self.block_size]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate(
        self, seq: Sequence, num_new_tokens: int, cached: list[KVBlock] | None = None
    ) -> bool:
        """Make room for ``num_new_tokens`` more tokens after the computed (and cached) ones.

        Returns False, changing nothing, when the pool cannot supply the blocks.
        """
        if not cached:  # the common case (a decode token): usually no new block is needed
            blocks = self.seq_blocks.get(seq.seq_id)
            if blocks is not None and (
                seq.num_computed_tokens + num_new_tokens <= len(blocks) * self.block_size
            ):
                return True
        cached = cached or []
        blocks = self.seq_blocks.setdefault(seq.seq_id, [])
        total = seq.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        need = cdiv(total, self.block_size) - len(blocks) - len(cached)
        reviving = sum(1 for b in cached if b.ref_cnt == 0)  # cached blocks now on the free list
        if need > self.pool.num_free_blocks - reviving:
            if not blocks:
                del self.seq_blocks[seq.seq_id]
            return False
        if cached:
            self.pool.touch(cached)
            blocks.extend(cached)
            self.num_registered[seq.seq_id] = len(blocks)
        if need > 0:
            blocks.extend(self.pool.allocate(need))
        return True

    def commit_computed(self, seq: Sequence, num_computed: int | None = None) -> None:
        """Index the request's blocks now full of computed tokens (the first ``num_computed``,
        default all computed ones)."""
        if not self.enable_prefix_caching or seq.seq_id not in self.seq_blocks:
            return
        if num_computed is None:
            num_computed = seq.num_computed_tokens
        start = self.num_registered.get(seq.seq_id, 0)
        end = min(num_computed, seq.num_tokens) // self.block_size
        if end <= start:
            return
        self._update_hashes(seq)
        blocks = self.seq_blocks[seq.seq_id]
        for i in range(start, end):
            self.pool.register(blocks[i], seq.block_hashes[i])
        self.num_registered[seq.seq_id] = end

    def fork(self, parent: Sequence, child: Sequence, num_computed: int | None = None) -> None:
        """Let ``child`` start from the full blocks of ``parent``'s first ``num_computed``
        tokens (shared, ref-counted); a parent without blocks (preempted) shares none."""
        if num_computed is None:
            num_computed = parent.num_computed_tokens
        k = num_computed // self.block_size
        shared = self.seq_blocks.get(parent.seq_id, [])[:k]
        k = len(shared)
        self.pool.touch(shared)
        self.seq_blocks[child.seq_id] = list(shared)
        self.num_registered[child.seq_id] = min(self.num_registered.get(parent.seq_id, 0), k)
        child.block_hashes = parent.block_hashes[:k]
        child.num_computed_tokens = k * self.block_size

    def free(self, seq: Sequence) -> None:
        """Return the request's blocks; the tail goes first so it is evicted first."""
        blocks = self.seq_blocks.pop(seq.seq_id, [])
        self.num_registered.pop(seq.seq_id, None)
        self.pool.release(reversed(blocks))

    def max_blocks_for(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)
