"""The worker's cache of vision-encoder outputs: one entry per image content hash.

An image is encoded once, when the first prompt span holding any of its placeholder tokens is
scheduled; the rows a later chunk needs (chunked prefill cutting through the image, a sequence
recomputed after preemption, an n > 1 sibling recomputing its last partial block, another live
request with the same image) are read from here. An entry lives while some live sequence on the
worker holds that image: sequences take a reference when the worker learns them and drop it when
they finish.
"""

from __future__ import annotations

import torch


class EncoderCache:
    """Encoder outputs by image content hash, referenced by the sequences that hold them."""

    def __init__(self) -> None:
        self.embeds: dict[bytes, torch.Tensor] = {}
        self.owners: dict[bytes, set[str]] = {}

    def __len__(self) -> int:
        return len(self.embeds)

    def hold(self, seq_id: str, hashes: list[bytes]) -> None:
        for h in hashes:
            self.owners.setdefault(h, set()).add(seq_id)

    def release(self, seq_id: str, hashes: list[bytes]) -> None:
        for h in hashes:
            owners = self.owners.get(h)
            if owners is None:
                continue
            owners.discard(seq_id)
            if not owners:
                del self.owners[h]
                self.embeds.pop(h, None)

    def get(self, content_hash: bytes) -> torch.Tensor | None:
        return self.embeds.get(content_hash)

    def put(self, content_hash: bytes, embeds: torch.Tensor) -> None:
        if content_hash in self.owners:  # nobody holds it any more: nothing to keep it for
            self.embeds[content_hash] = embeds
