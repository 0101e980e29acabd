"""Token embedding and LM head, with the vocabulary split across tensor-parallel ranks.

Both hold a [vocab, hidden] matrix: the embedding looks rows up, the LM head multiplies by
it (through its linear method, so it gets the skinny-GEMM dispatch for batch-1 decode and,
later, a quantized method if a checkpoint quantizes its head). Tied models share one matrix.

Sharded layout (rank r of p): ``ceil(vocab / p)`` rows per rank, rank r holding token ids
``[r * rows, min((r + 1) * rows, vocab))`` and zero padding after the last one; with p = 1
the shape is exactly [vocab, hidden]. With p > 1 the embedding looks up only the ids in its
range (zero rows for the others) and all-reduces, so every rank gets every token's row; the
head computes its ``rows`` logit columns, all-gathers them in rank order and drops the
padding columns, so every rank gets the full ``[T, vocab]`` logits (and can sample alike).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.distributed import get_tp_group, get_tp_rank, get_tp_size
from pagedllm.layers.quantization import (
    LinearMethodBase,
    QuantizationConfig,
    UnquantizedLinearMethod,
    get_linear_method,
)
from pagedllm.layers.weight_utils import copy_checked, param_label


class VocabParallelEmbedding(nn.Module):
    """Token-id lookup into a vocabulary-sharded ``weight`` [vocab rows of this rank, hidden]."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        params_dtype: torch.dtype | None = None,
        quant_config: QuantizationConfig | None = None,
        prefix: str = "",
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.prefix = prefix
        self.tp_rank = get_tp_rank()
        self.tp_size = get_tp_size()
        self.num_embeddings_per_partition = -(-num_embeddings // self.tp_size)
        self.vocab_start = min(self.tp_rank * self.num_embeddings_per_partition, num_embeddings)
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_partition, num_embeddings)
        self.quant_method = self._make_quant_method(quant_config, prefix)
        self.quant_method.create_weights(
            self,
            embedding_dim,
            [self.num_embeddings_per_partition],
            embedding_dim,
            num_embeddings,
            params_dtype or torch.get_default_dtype(),
            weight_loader=self.weight_loader,
        )

    def _make_quant_method(
        self, quant_config: QuantizationConfig | None, prefix: str
    ) -> LinearMethodBase:
        return UnquantizedLinearMethod()  # lookups stay dense whatever the checkpoint

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        """Copy this rank's vocabulary rows of the full [vocab, hidden] checkpoint tensor."""
        what = param_label(self, param, self.prefix)
        if tuple(loaded.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"{what} expects shape {(self.num_embeddings, self.embedding_dim)}, the "
                f"checkpoint tensor has shape {tuple(loaded.shape)}"
            )
        rows = self.vocab_end - self.vocab_start
        param.data[rows:].zero_()  # padding rows of the last rank
        copy_checked(param.data[:rows], loaded.narrow(0, self.vocab_start, rows), what)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        rows = F.embedding(torch.where(mine, input_ids - self.vocab_start, 0), self.weight)
        rows.masked_fill_(~mine.unsqueeze(-1), 0.0)
        return get_tp_group(self.tp_size).all_reduce(rows)


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states -> logits over this rank's vocabulary rows; may share the embedding's."""

    def _make_quant_method(
        self, quant_config: QuantizationConfig | None, prefix: str
    ) -> LinearMethodBase:
        return get_linear_method(quant_config, self, prefix)

    def tie_weights(self, embed_tokens: VocabParallelEmbedding) -> ParallelLMHead:
        """Use the embedding matrix (tied checkpoints store it once, as the embedding)."""
        if not isinstance(self.quant_method, UnquantizedLinearMethod):
            raise ValueError(f"{self.prefix or 'lm_head'}: cannot tie a quantized LM head")
        self.weight = embed_tokens.weight
        return self

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.quant_method.apply(self, hidden, None)
        if self.tp_size == 1:
            return logits
        return get_tp_group(self.tp_size).all_gather(logits, dim=-1)[..., : self.num_embeddings]
