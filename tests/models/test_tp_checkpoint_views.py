"""Checkpoint tensors read as views of the memory-mapped safetensors file (what lets a
tensor-parallel rank read only its slices) equal what safetensors itself reads."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagedllm.models.safetensors_mmap import iter_safetensors_views


def test_views_equal_safetensors_for_every_dtype(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(3, 5, generator=gen),
        "f16": torch.randn(4, 2, generator=gen).half(),
        "bf16": torch.randn(7, generator=gen).bfloat16(),
        "f64": torch.randn(2, 2, generator=gen).double(),
        "i32": torch.randint(-(2**31), 2**31 - 1, (3, 4), generator=gen, dtype=torch.int32),
        "i64": torch.arange(5, dtype=torch.int64) - 2,
        "u8": torch.arange(6, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    want = load_file(str(path))
    got = dict(iter_safetensors_views(path))
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    got["f32"].narrow(0, 1, 1).fill_(7.0)  # a private mapping: the file never changes
    assert torch.equal(load_file(str(path))["f32"], tensors["f32"])


def test_inconsistent_header_is_named(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}})
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(16))
    with pytest.raises(ValueError, match=r"bad\.safetensors: tensor w of shape \(2, 2\).*12 bytes"):
        list(iter_safetensors_views(path))
