"""Per-parameter weight loading: attributes on parameters, the default loader, a checked copy.

A parameter that needs more than a plain copy (a shard of a fused or tensor-parallel weight,
a packed quantized tensor) carries ``param.weight_loader(param, loaded, shard_id=None)``,
set by whoever created it (a layer or its quantization method). The model loader only maps
checkpoint names to parameters and calls that loader, or :func:`default_weight_loader` for
parameters without one (norms). Loaders also read layout attributes set here:

* ``output_dim`` / ``input_dim``: the dimension of the parameter that runs over output /
  input features (sharded by column- / row-parallel layers; absent when not sharded);
* ``packed_dim`` / ``packed_factor``: a dimension that stores ``packed_factor`` logical
  elements per stored element (e.g. eight 4-bit values per int32 in GPTQ's ``qweight``),
  so shard offsets along it are divided by that factor.
"""

from __future__ import annotations

from typing import Any

import torch


def set_weight_attrs(param: torch.Tensor, attrs: dict[str, Any]) -> None:
    """Attach loading attributes to ``param``; refuses to overwrite one already set."""
    for key, value in attrs.items():
        if hasattr(param, key):
            raise AttributeError(f"parameter attribute {key!r} is already set")
        setattr(param, key, value)


def copy_checked(dst: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    """``dst.copy_(loaded)`` after checking the shapes match; ``what`` names the destination."""
    if dst.shape != loaded.shape:
        raise ValueError(
            f"{what} expects shape {tuple(dst.shape)}, the checkpoint tensor has shape "
            f"{tuple(loaded.shape)}"
        )
    dst.copy_(loaded)


def narrow_shard(
    loaded: torch.Tensor, dim: int, rank: int, num_shards: int, dst: torch.Tensor, what: str
) -> torch.Tensor:
    """Rank ``rank``'s slice along ``dim`` of a checkpoint tensor split evenly into
    ``num_shards``, after checking the whole tensor has the shape that ``dst`` (one slice)
    implies."""
    full = list(dst.shape)
    full[dim] *= num_shards
    if list(loaded.shape) != full:
        raise ValueError(
            f"{what} expects shape {tuple(full)}, the checkpoint tensor has shape "
            f"{tuple(loaded.shape)}"
        )
    size = dst.shape[dim]
    return loaded.narrow(dim, rank * size, size)


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy a whole, unsharded tensor (norm weights and anything without its own loader)."""
    copy_checked(param.data, loaded, "the parameter")


def param_label(module: torch.nn.Module, param: torch.Tensor, prefix: str) -> str:
    """``"<prefix>.<attribute>"`` of ``param`` in ``module`` (for error messages)."""
    attr = next((n for n, p in module.named_parameters(recurse=False) if p is param), "param")
    return f"{prefix}.{attr}" if prefix else attr
