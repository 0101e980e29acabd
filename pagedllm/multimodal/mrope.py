"""M-RoPE position ids of a prompt with images (Qwen2-VL), computed once per sequence.

Text tokens count up one by one, the same id on all three rows. An image's placeholder tokens
take (t, row, column) of their merged patch, each offset by the position where the image
starts; the text after the image resumes at that start plus the image's larger side in merged
patches. So a prompt's last id is usually below its length, and every token after the prompt
(generated ones) sits at ``position + delta`` on all three rows, with
``delta = max id + 1 - prompt length``. This is transformers' ``get_rope_index`` for images,
written over the features' spans instead of token types.
"""

from __future__ import annotations

import numpy as np

from pagedllm.core.scheduler_output import MultiModalFeature


def mrope_positions(
    num_prompt: int, features: list[MultiModalFeature], merge_size: int
) -> tuple[np.ndarray, int]:
    """``([3, num_prompt] int64 ids, delta)`` for a prompt whose images are ``features``
    (sorted by offset); ``merge_size`` is the vision tower's ``spatial_merge_size``."""
    pos = np.empty((3, num_prompt), dtype=np.int64)
    cur = 0
    prev = 0
    for f in features:
        n = f.offset - prev
        pos[:, prev : f.offset] = np.arange(cur, cur + n)
        cur += n
        t, h, w = f.grid_thw
        gh, gw = h // merge_size, w // merge_size
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        pos[0, f.offset : f.end] = tt.ravel() + cur
        pos[1, f.offset : f.end] = hh.ravel() + cur
        pos[2, f.offset : f.end] = ww.ravel() + cur
        cur += max(gh, gw)
        prev = f.end
    pos[:, prev:] = np.arange(cur, cur + num_prompt - prev)
    delta = int(pos.max()) + 1 - num_prompt if num_prompt else 0
    return pos, delta
