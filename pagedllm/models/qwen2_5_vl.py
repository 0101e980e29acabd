"""Qwen2.5-VL: Qwen2-VL's language model and M-RoPE with a windowed vision tower.

Only the vision tower differs from Qwen2-VL (``qwen2_vl.py``): RMSNorm instead of LayerNorm,
a SwiGLU MLP with biases, a merger whose norm is RMSNorm and whose output size is
``out_hidden_size``, and window attention. For window attention the patches are reordered so
that the merge units (``merge x merge`` patches) of each ``window_size``-pixel window are
consecutive; most blocks attend only within a window, the ``fullatt_block_indexes`` blocks
within the whole image (the reorder keeps images contiguous), and the merger's outputs are put
back in the original order. Images' placeholder counts and M-RoPE ids are Qwen2-VL's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pagedllm.layers.linear import MergedColumnParallelLinear
from pagedllm.models.qwen2_vl import Qwen2VLForConditionalGeneration
from pagedllm.models.qwen2_vl_vision import (
    PatchEmbed,
    VisionAttention,
    VisionRotary,
    patch_positions,
    vision_activation,
)


class VisionRMSNorm(nn.Module):
    """RMSNorm computed in fp32 (transformers' ``Qwen2_5_VLRMSNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class VisionSwiGLU(nn.Module):
    """act(gate) * up, then down; gate and up fused as the checkpoint's parts 0 and 1."""

    def __init__(self, dim: int, hidden: int, act: str, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            dim, [hidden, hidden], bias=True, quant_config=None, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = nn.Linear(hidden, dim, bias=True)
        self.act = vision_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class WindowVisionBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, act: str, prefix: str) -> None:
        super().__init__()
        self.norm1 = VisionRMSNorm(dim)
        self.norm2 = VisionRMSNorm(dim)
        self.attn = VisionAttention(dim, heads)
        self.mlp = VisionSwiGLU(dim, hidden, act, f"{prefix}.mlp")

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lengths: list[int]
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, lengths)
        return x + self.mlp(self.norm2(x))


class WindowPatchMerger(nn.Module):
    def __init__(self, out_dim: int, dim: int, merge: int) -> None:
        super().__init__()
        self.hidden = dim * merge * merge
        self.ln_q = VisionRMSNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


def window_order(
    grids: list[tuple[int, int, int]], merge: int, units_per_window: int
) -> tuple[torch.Tensor, list[int]]:
    """(merge-unit order that makes each window's units consecutive, window lengths in
    patches). Windows are ``units_per_window`` units on a side, cut from each frame's top-left
    corner; edge windows are smaller."""
    order: list[torch.Tensor] = []
    lengths: list[int] = []
    base = 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        index = torch.arange(t * gh * gw).view(t, gh, gw)
        for f in range(t):
            for r in range(0, gh, units_per_window):
                for c in range(0, gw, units_per_window):
                    win = index[f, r : r + units_per_window, c : c + units_per_window].flatten()
                    order.append(win + base)
                    lengths.append(win.numel() * merge * merge)
        base += t * gh * gw
    return torch.cat(order), lengths


class Qwen2_5VisionTransformer(nn.Module):
    """The Qwen2.5-VL vision tower (see the module doc); ``vcfg`` is ``vision_config``."""

    def __init__(self, vcfg: dict[str, Any], out_dim: int) -> None:
        super().__init__()
        dim = int(vcfg.get("hidden_size", 1280))
        heads = int(vcfg.get("num_heads", 16))
        self.merge = int(vcfg.get("spatial_merge_size", 2))
        patch = int(vcfg.get("patch_size", 14))
        self.units_per_window = int(vcfg.get("window_size", 112)) // self.merge // patch
        if self.units_per_window < 1:
            raise ValueError(f"vision_config.window_size {vcfg.get('window_size')} is too small.")
        self.full_blocks = {int(i) for i in vcfg.get("fullatt_block_indexes", [])}
        self.patch_embed = PatchEmbed(
            int(vcfg.get("in_channels", vcfg.get("in_chans", 3))),
            int(vcfg.get("temporal_patch_size", 2)),
            patch,
            dim,
        )
        theta = float((vcfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        self.rotary = VisionRotary(dim // heads, theta)
        hidden = int(vcfg.get("intermediate_size", 3420))
        act = str(vcfg.get("hidden_act", "silu"))
        self.blocks = nn.ModuleList(
            WindowVisionBlock(dim, heads, hidden, act, f"visual.blocks.{i}")
            for i in range(int(vcfg.get("depth", 32)))
        )
        self.merger = WindowPatchMerger(int(vcfg.get("out_hidden_size", out_dim)), dim, self.merge)

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        x = self.patch_embed(pixels)
        unit = self.merge * self.merge
        order, windows = window_order(grids, self.merge, self.units_per_window)
        order = order.to(x.device)

        def by_window(t: torch.Tensor) -> torch.Tensor:
            return t.view(-1, unit, t.shape[-1])[order].reshape(-1, t.shape[-1])

        x = by_window(x)
        cos, sin = self.rotary(patch_positions(grids, self.merge).to(x.device))
        rope = (by_window(cos), by_window(sin))
        frames = [h * w for t, h, w in grids for _ in range(t)]
        for i, block in enumerate(self.blocks):
            x = block(x, rope, frames if i in self.full_blocks else windows)
        out = self.merger(x)
        return out[torch.argsort(order)]


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2-VL with the windowed vision tower of Qwen2.5-VL."""

    @staticmethod
    def build_vision(vcfg: dict[str, Any], out_dim: int) -> nn.Module:
        return Qwen2_5VisionTransformer(vcfg, out_dim)
