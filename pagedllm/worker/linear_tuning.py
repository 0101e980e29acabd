"""Start-up measurement: for which row counts does the Triton skinny GEMM beat cuBLAS?

For every distinct (N, K) weight shape of the model's dense linear layers (the layers and LM
head whose method is ``UnquantizedLinearMethod``; quantized methods have their own kernels)
and M in 1, 2, 4, 8, 16 rows, both are timed from CUDA-graph replays (no launch overhead, as
inside the decode graphs). Each layer's ``skinny_max_rows``, which the method's ``apply``
reads, becomes the largest M up to which the Triton kernel was faster at every measured M;
the table is logged. Half-precision CUDA models only (fp32 keeps cuBLAS, whose fp32 GEMMs
are exact rather than TF32).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.device_utils import cuda_graph_time_us
from pagedllm.layers.embedding import ParallelLMHead
from pagedllm.layers.linear import LinearBase
from pagedllm.layers.quantization import UnquantizedLinearMethod

logger = logging.getLogger(__name__)

ROWS = (1, 2, 4, 8, 16)
MIN_GAIN = 0.97  # Triton must take at most 97% of cuBLAS's time to be chosen


def skinny_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose matmul may go to the skinny GEMM (dense linear layers and LM head)."""
    return [
        m
        for m in model.modules()
        if isinstance(m, (LinearBase, ParallelLMHead))
        and isinstance(m.quant_method, UnquantizedLinearMethod)
    ]


def tune_skinny_linears(model: nn.Module) -> None:
    """Set ``skinny_max_rows`` on every dense linear layer of a half-precision CUDA model."""
    from pagedllm.kernels.skinny_gemm import skinny_linear

    layers = skinny_layers(model)
    if not layers or layers[0].weight.device.type != "cuda":
        return
    if layers[0].weight.dtype not in (torch.float16, torch.bfloat16):
        return
    if any(layer.weight.stride(1) != 1 for layer in layers):
        return
    decided: dict[tuple[int, int, bool], int] = {}
    lines = []
    for layer in layers:
        w, b = layer.weight, getattr(layer, "bias", None)
        key = (w.shape[0], w.shape[1], b is not None)
        if key not in decided:
            best = 0
            times = []
            for m in ROWS:
                x = torch.randn(m, w.shape[1], device=w.device, dtype=w.dtype)
                t_cublas = cuda_graph_time_us(lambda x=x, w=w, b=b: F.linear(x, w, b))
                t_triton = cuda_graph_time_us(lambda x=x, w=w, b=b: skinny_linear(x, w, b))
                times.append(f"M={m}: {t_cublas:.1f}/{t_triton:.1f}")
                if t_triton > MIN_GAIN * t_cublas:
                    break
                best = m
            decided[key] = best
            lines.append(
                f"  N={key[0]} K={key[1]}: skinny up to M={best} (cuBLAS/Triton µs {times})"
            )
        layer.skinny_max_rows = decided[key]
    logger.info("Skinny GEMM dispatch (measured):\n%s", "\n".join(lines))
