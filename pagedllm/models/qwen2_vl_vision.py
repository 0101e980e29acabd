"""The Qwen2-VL vision transformer: image patches in, one embedding per merged 2x2 patch out.

An image arrives as transformers' image processor leaves it: ``pixel_values``
``[num_patches, C * T * P * P]`` (the patches already in merge-window order) and its grid
``(t, h, w)`` in patches. The tower is a plain ViT: a linear patch embedding (the checkpoint's
``Conv3d`` whose stride equals its kernel, applied as one matmul), blocks of LayerNorm,
bidirectional attention with a 2D rotary embedding (a patch's row index rotates the first half
of each head's rotary frequencies, its column index the second half) and a quick-GELU MLP, then
the patch merger (LayerNorm, 4 neighbouring patches concatenated, a two-layer GELU MLP) into
the language model's hidden size.

Attention never crosses images (or video frames): each frame's patches attend among
themselves. The tower is not tensor-parallel and does not use the paged KV cache: it runs once
per image, when the prompt span holding the image's placeholder tokens is first scheduled, and
its output is cached by the runner for the rest of the request.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": F.gelu,
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def vision_activation(name: str) -> Any:
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"Vision hidden_act {name!r} is not supported; supported: {', '.join(_ACTIVATIONS)}."
        )
    return _ACTIVATIONS[name]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def patch_positions(grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """``[N, 2]`` (row, column) of every patch, in the processor's merge-window order."""
    out = []
    for t, h, w in grids:
        hpos = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        wpos = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        pos = torch.stack([hpos.transpose(1, 2).flatten(), wpos.transpose(1, 2).flatten()], dim=-1)
        out.append(pos.repeat(t, 1))
    return torch.cat(out)


class VisionRotary(nn.Module):
    """2D rotary of the vision heads: row and column frequencies side by side."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        dim = head_dim // 2
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``pos`` [N, 2] -> cos, sin [N, head_dim] (fp32)."""
        freqs = pos.to(torch.float32)[..., None] * self.inv_freq.float()  # [N, 2, d/4]
        freqs = freqs.flatten(1)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def apply_vision_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] rotated in fp32, returned in its own dtype."""
    xf = x.float()
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def attend_per_image(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], scale: float
) -> torch.Tensor:
    """Bidirectional attention within each run of ``lengths`` rows; q/k/v [N, H, D]."""
    outs = []
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        o = F.scaled_dot_product_attention(
            q[sl].transpose(0, 1), k[sl].transpose(0, 1), v[sl].transpose(0, 1), scale=scale
        )
        outs.append(o.transpose(0, 1))
        start += n
    return torch.cat(outs)


class VisionAttention(nn.Module):
    """Fused qkv (with bias), 2D rotary, per-image attention, output projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lengths: list[int]
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = apply_vision_rotary(q, *rope), apply_vision_rotary(k, *rope)
        out = attend_per_image(q, k, v, lengths, self.head_dim**-0.5)
        return self.proj(out.reshape(n, -1))


class VisionMlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = vision_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-LayerNorm attention and MLP with residuals."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, act: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = VisionMlp(dim, mlp_hidden, act)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lengths: list[int]
    ) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, lengths)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """The checkpoint's ``Conv3d`` (kernel = stride = one patch) as a single matmul."""

    def __init__(self, in_channels: int, temporal: int, patch: int, dim: int) -> None:
        super().__init__()
        k = (temporal, patch, patch)
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=k, stride=k, bias=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixels.to(w.dtype), w.view(w.shape[0], -1))


class PatchMerger(nn.Module):
    """LayerNorm, then every ``merge x merge`` patches (consecutive rows) into one embedding."""

    def __init__(self, out_dim: int, dim: int, merge: int) -> None:
        super().__init__()
        self.hidden = dim * merge * merge
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.hidden, self.hidden), nn.GELU(), nn.Linear(self.hidden, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.hidden))


class Qwen2VisionTransformer(nn.Module):
    """The Qwen2-VL vision tower (see the module doc); ``vcfg`` is ``vision_config``."""

    def __init__(self, vcfg: dict[str, Any], out_dim: int) -> None:
        super().__init__()
        dim = int(vcfg.get("embed_dim", 1280))
        heads = int(vcfg.get("num_heads", 16))
        self.merge = int(vcfg.get("spatial_merge_size", 2))
        self.patch_embed = PatchEmbed(
            int(vcfg.get("in_channels", vcfg.get("in_chans", 3))),
            int(vcfg.get("temporal_patch_size", 2)),
            int(vcfg.get("patch_size", 14)),
            dim,
        )
        theta = float((vcfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        self.rotary = VisionRotary(dim // heads, theta)
        hidden = int(dim * float(vcfg.get("mlp_ratio", 4)))
        act = str(vcfg.get("hidden_act", "quick_gelu"))
        self.blocks = nn.ModuleList(
            VisionBlock(dim, heads, hidden, act) for _ in range(int(vcfg.get("depth", 32)))
        )
        self.merger = PatchMerger(int(vcfg.get("hidden_size", out_dim)), dim, self.merge)

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """``pixels`` [N, C*T*P*P] of the images with ``grids`` -> [N / merge**2, out_dim]."""
        x = self.patch_embed(pixels)
        rope = self.rotary(patch_positions(grids, self.merge).to(x.device))
        lengths = [h * w for t, h, w in grids for _ in range(t)]
        for block in self.blocks:
            x = block(x, rope, lengths)
        return self.merger(x)
