"""Checkpoint tensors as zero-copy views of memory-mapped safetensors files.

``safe_open(...).get_tensor`` reads a whole tensor into fresh memory, so under tensor
parallelism every rank would read every byte of the checkpoint to keep 1/p of it. Here each
file is mapped once (a private, copy-on-write mapping: nothing is ever written back) and each
tensor is a ``torch.frombuffer`` view of its bytes. The layers' weight loaders narrow that view
to their rank's slice and copy only it into the parameter, so the operating system reads only
the pages that slice touches (whole rows for a column-parallel or vocabulary slice, parts of
every row for a row-parallel one); the loaders' API (a ``torch.Tensor``) stays as it is.

The format: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON mapping each
name to ``dtype``, ``shape`` and ``data_offsets`` (relative to the end of the header), then
the data, little-endian and C-contiguous.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def iter_safetensors_views(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every tensor of ``path``, in file order, as views of a mapping.

    The views keep the mapping alive; they must not be written to (nothing here does).
    """
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if header_len else None
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    for name, info in entries:
        dtype_name = info["dtype"]
        if dtype_name not in DTYPES:
            raise ValueError(f"{path.name}: tensor {name} has unsupported dtype {dtype_name}.")
        dtype, shape = DTYPES[dtype_name], list(info["shape"])
        begin, end = info["data_offsets"]
        numel = 1
        for size in shape:
            numel *= size
        if end - begin != numel * dtype.itemsize:
            raise ValueError(
                f"{path.name}: tensor {name} of shape {tuple(shape)} and dtype {dtype_name} "
                f"has {end - begin} bytes of data."
            )
        if numel == 0:
            yield name, torch.empty(shape, dtype=dtype)
            continue
        assert mapping is not None
        flat = torch.frombuffer(mapping, dtype=dtype, count=numel, offset=data_start + begin)
        yield name, flat.view(shape)
