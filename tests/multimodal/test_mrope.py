"""M-RoPE ids from the features' spans equal transformers' ``get_rope_index`` (token types),
for prompts with 0, 1 and 2 images of different grids, images at the start and at the end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pagedllm.core.scheduler_output import MultiModalFeature
from pagedllm.multimodal.mrope import mrope_positions

IMAGE = 8


def _prompt(layout: list[int | tuple[int, int, int]]) -> tuple[list[int], list[MultiModalFeature]]:
    """ids and features from a layout of text runs (int) and image grids (t, h, w)."""
    ids: list[int] = []
    feats = []
    for item in layout:
        if isinstance(item, int):
            ids.extend([100 + len(ids) % 7] * item)
        else:
            t, h, w = item
            n = t * h * w // 4
            feats.append(MultiModalFeature(len(ids), n, b"", None, item))
            ids.extend([IMAGE] * n)
    return ids, feats


def _hf(ids: list[int], grids: list[tuple[int, int, int]]) -> tuple[np.ndarray, int]:
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    cfg = Qwen2VLConfig(image_token_id=IMAGE)
    input_ids = torch.tensor([ids])
    types = (input_ids == IMAGE).int()
    grid = torch.tensor(grids) if grids else None
    stub = type("Stub", (), {"config": cfg, "get_vision_position_ids": None})()
    stub.get_vision_position_ids = lambda *a, **k: Qwen2VLModel.get_vision_position_ids(
        stub, *a, **k
    )
    if grid is None:
        n = len(ids)
        return np.tile(np.arange(n), (3, 1)), 0
    pos, delta = Qwen2VLModel.get_rope_index(stub, input_ids, types, image_grid_thw=grid)
    return pos[:, 0].numpy(), int(delta[0, 0])


@pytest.mark.parametrize(
    "layout",
    [
        [12],
        [3, (1, 4, 6), 5],
        [(1, 2, 2), 4],
        [2, (1, 2, 4), 3, (1, 6, 4), 2],
        [4, (1, 8, 2)],
    ],
)
def test_equals_transformers(layout: list[int | tuple[int, int, int]]) -> None:
    ids, feats = _prompt(layout)
    pos, delta = mrope_positions(len(ids), feats, 2)
    ref_pos, ref_delta = _hf(ids, [f.grid_thw for f in feats])
    np.testing.assert_array_equal(pos, ref_pos)
    assert delta == ref_delta
