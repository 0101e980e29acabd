"""fp8 weights (``quant_method: fp8``, or ``quantization="fp8"`` on a plain checkpoint).

Two sources, one layout after loading: ``weight`` float8_e4m3fn [N, K] and ``weight_scale``
float32 [N] (one scale per output row), plus ``input_scale`` (one float32 scalar) when
activations are quantized with a static scale; otherwise each token's activations get their
own scale at run time. The GEMM is ``fp8_utils.fp8_linear`` (``torch._scaled_mm`` on GPUs with
fp8 tensor cores, dequantize-then-matmul elsewhere).

* **Quantize at load** (``--quantization fp8`` on a bf16/fp16/fp32 checkpoint): the layer
  registers a dense ``weight`` in the model dtype, loads it like an unquantized layer, and
  ``process_weights_after_loading`` replaces it by its per-output-channel fp8 quantization.
* **fp8 checkpoints** (vLLM / AutoFP8 / llm-compressor's ``quant_method: fp8``): ``weight`` in
  float8_e4m3fn, ``weight_scale`` per tensor (a scalar) or per output channel ([N] or [N, 1]),
  and with ``activation_scheme: static`` an ``input_scale`` scalar per checkpoint module.

Fused layers (q/k/v, gate/up) load one checkpoint part at a time, each with its own scales.
Per-tensor weight scales are not requantized to a shared one (vLLM takes the parts' maximum
and requantizes the weights): a part's scalar is written into the rows of that part of the
per-channel ``weight_scale``, which the GEMM applies anyway, so the checkpoint's values are
kept exactly. Static input scales cannot differ per part (the parts share one input, hence one
quantized activation): the fused layer uses the largest, which never saturates a part's range.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.layers.quantization import register_quantization_config
from pagedllm.layers.quantization.base import LinearMethodBase, QuantizationConfig
from pagedllm.layers.quantization.fp8_utils import (
    FP8_DTYPE,
    dequantize_rows,
    fp8_linear,
    quantize_rows,
    quantize_tokens,
    quantize_with_scale,
    unit_scale,
)
from pagedllm.layers.weight_utils import set_weight_attrs

ACTIVATION_SCHEMES = ("dynamic", "static")
# Checkpoint modules fused into one layer: a fused layer's name -> its parts' names.
FUSED_PARTS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}


@register_quantization_config("fp8")
class Fp8Config(QuantizationConfig):
    """fp8 weights: from an fp8 checkpoint (``is_checkpoint_fp8``) or quantized at load."""

    def __init__(
        self,
        is_checkpoint_fp8: bool,
        activation_scheme: str = "dynamic",
        ignored_layers: list[str] | None = None,
    ) -> None:
        if activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(
                f"fp8 activation_scheme {activation_scheme!r} is not supported (supported: "
                f"{', '.join(ACTIVATION_SCHEMES)})"
            )
        if activation_scheme == "static" and not is_checkpoint_fp8:
            raise ValueError("a static fp8 activation scheme needs input scales from a checkpoint")
        self.is_checkpoint_fp8 = is_checkpoint_fp8
        self.activation_scheme = activation_scheme
        self.ignored_layers = list(ignored_layers or [])

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Fp8Config:
        block = config.get("weight_block_size")
        if block is not None:
            raise ValueError(
                f"fp8 checkpoints with weight_block_size={block!r} are not supported "
                "(supported: per-tensor or per-channel weight scales)"
            )
        ignored = list(config.get("ignored_layers") or [])
        ignored += list(config.get("modules_to_not_convert") or [])
        return cls(True, str(config.get("activation_scheme", "dynamic")), ignored)

    @classmethod
    def quantize_at_load(cls) -> Fp8Config:
        """``--quantization fp8`` on a plain checkpoint: per-channel weights, dynamic tokens."""
        return cls(False)

    def is_ignored(self, prefix: str) -> bool:
        """Whether the checkpoint keeps module ``prefix`` (a fused one: all its parts) dense."""
        head, _, leaf = prefix.rpartition(".")
        parts = FUSED_PARTS.get(leaf)
        names = [f"{head}.{p}" if head else p for p in parts] if parts else [prefix]
        flags = [any(_matches(name, entry) for entry in self.ignored_layers) for name in names]
        if any(flags) and not all(flags):
            raise ValueError(
                f"{prefix}: the fp8 checkpoint ignores only some of its fused parts "
                f"({', '.join(n for n, f in zip(names, flags, strict=True) if f)}); the parts "
                "of a fused layer must all be fp8 or all be dense"
            )
        return all(flags)

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        from pagedllm.layers.linear import LinearBase

        if not isinstance(layer, LinearBase) or self.is_ignored(prefix):
            return None
        return Fp8LinearMethod(self)


def _matches(name: str, entry: str) -> bool:
    """An ``ignored_layers`` entry names a module, a suffix of its dotted name, or a parent."""
    return name == entry or name.endswith("." + entry) or name.startswith(entry + ".")


class Fp8LinearMethod(LinearMethodBase):
    """fp8 weights with per-output-channel scales; activations quantized per token or static.

    Tensor parallelism: the weight and its per-row scales are cut like dense ones; a
    row-parallel layer quantizes its slice of each token's activations with that slice's own
    scale (as vLLM does), so TP > 1 rounds activations a little differently from one rank.
    """

    supports_tensor_parallel = True

    def __init__(self, config: Fp8Config) -> None:
        self.config = config

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        n, k = sum(output_partition_sizes), input_size_per_partition
        layer_loader = extra_weight_attrs["weight_loader"]
        layout = {"input_dim": 1, "output_dim": 0}
        if not self.config.is_checkpoint_fp8:
            weight = nn.Parameter(torch.empty(n, k, dtype=params_dtype), requires_grad=False)
            set_weight_attrs(weight, {**layout, **extra_weight_attrs})
            layer.register_parameter("weight", weight)
            return
        # Dummy (random) weights keep these construction values: small random fp8 values
        # (uniform_ is not defined for fp8) with scales of a plausible size.
        weight = nn.Parameter(_random_fp8((n, k)), requires_grad=False)
        loader = _Fp8WeightLoader(layer_loader)
        set_weight_attrs(weight, {**layout, "weight_loader": loader, "dummy_keep": True})
        layer.register_parameter("weight", weight)
        scale = nn.Parameter(torch.full((n,), 1e-2, dtype=torch.float32), requires_grad=False)
        set_weight_attrs(
            scale,
            {"output_dim": 0, "weight_loader": _WeightScaleLoader(layer, layer_loader)},
        )
        set_weight_attrs(scale, {"dummy_keep": True})
        layer.register_parameter("weight_scale", scale)
        if self.config.activation_scheme == "static":
            parts = len(output_partition_sizes)
            input_scale = nn.Parameter(torch.ones(parts, dtype=torch.float32), requires_grad=False)
            set_weight_attrs(
                input_scale, {"weight_loader": _InputScaleLoader(layer), "dummy_keep": True}
            )
            layer.register_parameter("input_scale", input_scale)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        name = getattr(layer, "prefix", "") or type(layer).__name__
        if layer.weight.is_cuda:
            unit_scale(layer.weight.device)
        if not self.config.is_checkpoint_fp8:
            q, scale = quantize_rows(layer.weight.data)
            del layer.weight
            layer.register_parameter("weight", nn.Parameter(q, requires_grad=False))
            layer.register_parameter("weight_scale", nn.Parameter(scale, requires_grad=False))
        scale = layer.weight_scale.data
        if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise ValueError(f"{name}.weight_scale has non-positive or non-finite values")
        # The CPU path (tests, references) dequantizes the weight once, not at every step: the
        # same values, held beside the fp8 ones (CPU memory is not what fp8 is for).
        layer.fp8_dequantized = None
        if layer.weight.device.type == "cpu":
            layer.fp8_dequantized = dequantize_rows(layer.weight, scale, layer.params_dtype)
        if self.config.is_checkpoint_fp8 and self.config.activation_scheme == "static":
            input_scale = layer.input_scale.data.max()
            if not bool(torch.isfinite(input_scale)) or float(input_scale) <= 0:
                raise ValueError(f"{name}.input_scale must be positive and finite")
            del layer.input_scale
            layer.register_parameter("input_scale", nn.Parameter(input_scale, requires_grad=False))

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.config.activation_scheme == "static":
            x_scale = layer.input_scale.expand(x2.shape[0])
            xq = quantize_with_scale(x2, layer.input_scale)
        else:
            xq, x_scale = quantize_tokens(x2)
        dense = layer.fp8_dequantized
        if dense is not None and dense.dtype == x.dtype:
            out = F.linear(dequantize_rows(xq, x_scale, x.dtype), dense, bias)
        else:
            out = fp8_linear(xq, x_scale, layer.weight, layer.weight_scale, x.dtype, bias)
        return out.reshape(*lead, out.shape[-1])


def _random_fp8(shape: tuple[int, int]) -> torch.Tensor:
    """Random e4m3 values of magnitude <= 0.5 from their bit patterns (never NaN)."""
    magnitude = torch.randint(0, 0x38, shape, dtype=torch.uint8)  # exponent <= 6: |v| < 0.5
    sign = torch.randint(0, 2, shape, dtype=torch.uint8) << 7
    return (magnitude | sign).view(FP8_DTYPE)


class _Fp8WeightLoader:
    """The layer's loader, after checking the checkpoint tensor is float8_e4m3fn."""

    def __init__(self, layer_loader: Any) -> None:
        self.layer_loader = layer_loader

    def __call__(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        if loaded.dtype != FP8_DTYPE:
            raise ValueError(
                f"an fp8 checkpoint weight must be float8_e4m3fn, got {loaded.dtype} "
                "(supported: float8_e4m3fn)"
            )
        self.layer_loader(param, loaded, shard_id)


def _part_rows(layer: nn.Module, shard_id: int | str | None) -> int:
    """Rows of checkpoint part ``shard_id`` of ``layer`` (all of them for ``None``), unsharded."""
    sizes = list(getattr(layer, "output_sizes", [layer.output_size]))
    if shard_id is None:
        return sum(sizes)
    shard_ids = getattr(layer, "shard_ids", ())
    if shard_id not in shard_ids:
        raise ValueError(f"unknown shard id {shard_id!r} (expected one of {shard_ids})")
    return sizes[shard_ids.index(shard_id)]


class _WeightScaleLoader:
    """Per-tensor (a scalar, written into every row of its part) or per-channel scales, then
    the layer's own loader (which cuts the part's rows and this rank's slice)."""

    def __init__(self, layer: nn.Module, layer_loader: Any) -> None:
        self.layer = layer
        self.layer_loader = layer_loader

    def __call__(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        rows = _part_rows(self.layer, shard_id)
        if loaded.numel() == 1:
            loaded = loaded.reshape(1).float().expand(rows)
        elif tuple(loaded.shape) in ((rows,), (rows, 1)):
            loaded = loaded.reshape(rows).float()
        else:
            raise ValueError(
                f"weight_scale of shape {tuple(loaded.shape)} is neither per-tensor (one value) "
                f"nor per-channel ({rows} or ({rows}, 1)); block-wise scales are not supported"
            )
        self.layer_loader(param, loaded, shard_id)


class _InputScaleLoader:
    """A static activation scale (a scalar) per checkpoint part, at the part's index."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer

    def __call__(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None
    ) -> None:
        if loaded.numel() != 1:
            raise ValueError(
                f"input_scale must be one value (per-tensor static scale), got shape "
                f"{tuple(loaded.shape)}"
            )
        value = loaded.reshape(()).float()
        if shard_id is None:
            param.data.fill_(value)
            return
        _part_rows(self.layer, shard_id)  # checks the shard id
        param.data[list(self.layer.shard_ids).index(shard_id)] = value
