"""Quantization plug-in point: the scheme registry and the per-layer method factory.

``get_quant_config`` reads the ``quantization_config`` section of a model's ``config.json``
and builds the registered :class:`QuantizationConfig` for its ``quant_method`` (``None`` for
plain checkpoints). The model passes it down to every linear layer, which calls
:func:`get_linear_method`; without a config, or where the config returns ``None`` for a
layer, that is :class:`UnquantizedLinearMethod`. A scheme is a module that defines a config
and a method and decorates the config with ``@register_quantization_config(name)``: GPTQ
(``gptq.py``) and AWQ (``awq.py``), both weight-only integer formats (``weight_only.py``,
``packing.py``), and fp8 (``fp8.py``), which also quantizes a plain checkpoint at load when
the user asks for ``quantization="fp8"``. ``config/model.py`` checks a checkpoint's bits and
layout torch-free before anything is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from pagedllm.layers.quantization.base import LinearMethodBase, QuantizationConfig
from pagedllm.layers.quantization.unquantized import UnquantizedLinearMethod

if TYPE_CHECKING:
    from pagedllm.config import EngineConfig

__all__ = [
    "QUANTIZATION_METHODS",
    "LinearMethodBase",
    "QuantizationConfig",
    "UnquantizedLinearMethod",
    "get_linear_method",
    "get_quant_config",
    "register_quantization_config",
]

QUANTIZATION_METHODS: dict[str, type[QuantizationConfig]] = {}

_C = type[QuantizationConfig]


def register_quantization_config(name: str) -> Callable[[_C], _C]:
    """Class decorator: make ``cls`` the config for ``quant_method == name``."""

    def register(cls: _C) -> _C:
        if name in QUANTIZATION_METHODS and QUANTIZATION_METHODS[name] is not cls:
            raise ValueError(f"quantization method {name!r} is already registered")
        QUANTIZATION_METHODS[name] = cls
        return cls

    return register


def get_quant_config(config: EngineConfig) -> QuantizationConfig | None:
    """The quantization config of the model in ``config`` (``None``: not quantized)."""
    section = config.model_config.arch.raw.get("quantization_config")
    if not section:
        if config.model_config.quantization == "fp8":  # a plain checkpoint, quantized at load
            from pagedllm.layers.quantization.fp8 import Fp8Config

            return Fp8Config.quantize_at_load()
        return None
    name = str(section.get("quant_method", "")).lower()
    if name not in QUANTIZATION_METHODS:
        supported = ", ".join(sorted(QUANTIZATION_METHODS)) or "none yet"
        raise ValueError(
            f"config.json asks for quantization method {name!r}, which pagedllm does not "
            f"support (supported: {supported})."
        )
    return QUANTIZATION_METHODS[name].from_config(section)


def get_linear_method(
    quant_config: QuantizationConfig | None, layer: nn.Module, prefix: str
) -> LinearMethodBase:
    """The method ``layer`` (named ``prefix``) computes with: quantized, or the dense one."""
    method = quant_config.get_quant_method(layer, prefix) if quant_config is not None else None
    return method if method is not None else UnquantizedLinearMethod()


# The schemes register themselves on import (after the registry above exists).
from pagedllm.layers.quantization import awq, fp8, gptq  # noqa: E402, F401
