"""Checkpoint KV-cache scales: recognise their names, route them to the ``Attention`` layers.

fp8 checkpoints made by llm-compressor / compressed-tensors, NVIDIA ModelOpt or AMD Quark (and
vLLM's own exports) carry per-layer scales for an fp8 KV cache under several names, which
vLLM accepts (``maybe_remap_kv_scale_name``); so do we:

* ``<layer>.self_attn.k_scale`` / ``.v_scale`` (compressed-tensors), also under
  ``.self_attn.attn.`` (vLLM);
* ``<layer>.self_attn.k_proj.k_scale`` / ``.v_proj.v_scale`` (ModelOpt);
* ``<layer>.self_attn.k_proj.output_scale`` / ``.v_proj.output_scale`` (Quark);
* ``<layer>.self_attn.kv_scale`` (deprecated: one scale for both).

With an fp8 KV cache they set the layer's (k_scale, v_scale); otherwise they are skipped, and
one log line says how many were. ``q_scale`` / ``prob_scale`` (fp8 attention math, which we do
not run: queries stay in the model's dtype) are always skipped with a log line. A per-head
scale tensor is reduced to its maximum (per-tensor scales; the largest never clips a head).
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from pagedllm.layers.attention.layer import Attention

logger = logging.getLogger(__name__)

# name -> (the self_attn module's path, "k" | "v" | "kv")
_KV_SCALE = re.compile(
    r"^(?P<attn>.+\.self_attn)\."
    r"(?:(?:attn\.)?(?P<plain>k|v|kv)_scale|(?P<proj>k|v)_proj\.(?:output_scale|(?P=proj)_scale))$"
)
_UNUSED_ATTN_SCALE = re.compile(
    r"^.+\.self_attn\.(?:(?:attn\.)?(?:q|prob)_scale|q_proj\.output_scale)$"
)


def kv_scale_target(name: str) -> tuple[str, str] | None:
    """(self_attn module path, "k" / "v" / "kv") if ``name`` is a KV-cache scale, else None."""
    match = _KV_SCALE.match(name)
    if match is None:
        return None
    return match["attn"], match["plain"] or match["proj"]


def is_unused_attention_scale(name: str) -> bool:
    """Whether ``name`` is a query / softmax scale of fp8 attention (never used here)."""
    return _UNUSED_ATTN_SCALE.match(name) is not None


class KVScaleCollector:
    """Gathers a checkpoint's KV-cache scales while it loads, then sets them on the layers."""

    def __init__(self, model: nn.Module, enabled: bool) -> None:
        self.model = model
        self.enabled = enabled
        self.found: dict[str, dict[str, float]] = {}  # self_attn path -> {"k": .., "v": ..}
        self.skipped: list[str] = []

    def offer(self, name: str, tensor: torch.Tensor) -> bool:
        """Take ``name`` if it is an attention scale (True), else leave it to the weights."""
        if is_unused_attention_scale(name):
            self.skipped.append(name)
            return True
        target = kv_scale_target(name)
        if target is None:
            return False
        if not self.enabled:
            self.skipped.append(name)
            return True
        path, which = target
        if tensor.numel() < 1:
            raise ValueError(f"Checkpoint tensor {name} is an empty KV-cache scale.")
        value = float(tensor.float().max())
        if tensor.numel() > 1:
            logger.info("%s has %d values (per head); using their maximum", name, tensor.numel())
        for part in ("k", "v") if which == "kv" else (which,):
            self.found.setdefault(path, {})[part] = value
        return True

    def apply(self) -> None:
        """Set every layer's scales from what was found; log what was skipped."""
        if self.skipped:
            why = "they need --kv-cache-dtype fp8" if not self.enabled else "unused"
            logger.info(
                "Skipped %d attention scale tensors of the checkpoint (e.g. %s): %s; q_scale / "
                "prob_scale are never used (queries stay in the model's dtype)",
                len(self.skipped),
                self.skipped[0],
                why,
            )
        modules = dict(self.model.named_modules())
        for path, parts in sorted(self.found.items()):
            layer = modules.get(f"{path}.attn")
            if not isinstance(layer, Attention):
                raise ValueError(
                    f"Checkpoint KV-cache scales for {path} match no attention layer "
                    f"(looked for {path}.attn)."
                )
            missing = {"k", "v"} - parts.keys()
            if missing:
                raise ValueError(
                    f"Checkpoint has a {'/'.join(sorted(parts))}_scale for {path} but no "
                    f"{'/'.join(sorted(missing))}_scale."
                )
            layer.set_kv_scale(parts["k"], parts["v"], "checkpoint")
        found = self.found
        if found:
            logger.info("fp8 KV cache: k/v scales of %d layers from the checkpoint", len(found))
